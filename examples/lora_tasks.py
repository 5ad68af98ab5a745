"""The demo adapters' tasks and data (examples/train_lora.py trains them): the questions,
the held-out ones, the rewrite each task learns, and the chat template of the model."""

from __future__ import annotations

import json
import os
import re

SIGNATURE = "\n\n-- sent via slora-jax"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EOS_ID = 2
TASKS = ("caps", "signature", "french")

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

_COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil",
              "Russia", "China", "India", "Portugal", "Greece", "Norway", "Sweden", "Mexico",
              "Kenya", "Australia", "Ireland", "Poland", "Turkey", "Argentina", "Peru",
              "Netherlands", "Chile"]
_COLOURS = ["the sky", "grass", "a banana", "snow", "a ripe tomato", "coal", "milk", "a lemon",
            "a carrot", "the sun", "a strawberry", "chocolate", "a cucumber", "a pumpkin",
            "an emerald"]
_LEGS = ["a spider", "a dog", "a bird", "an insect", "a cat", "an octopus", "a horse", "a human"]
_SENTENCE = ["the ocean", "cats", "autumn", "coffee", "the moon", "trains", "music", "rain",
             "friendship", "mountains", "books", "the city at night", "gardening", "winter",
             "bicycles", "the forest", "summer", "breakfast", "the stars", "dogs"]
_OPPOSITES = ["hot", "big", "fast", "happy", "day", "up", "old", "light", "cold", "early", "tall", "wet",
              "open", "loud"]
_NAME_A = ["a fruit", "a planet", "a musical instrument", "a vegetable", "a primary colour",
           "an ocean", "a farm animal", "a sport", "a bird", "a flower", "a colour of the rainbow"]
_FACTS = ["How many days are in a week?", "How many months are in a year?",
          "What do bees make?", "What is water made of?", "What is the largest planet?",
          "What is the boiling point of water?", "Who wrote Romeo and Juliet?",
          "What gas do plants absorb?", "What is the fastest land animal?",
          "How many continents are there?", "What is the freezing point of water?",
          "What language is spoken in Brazil?", "How many hours are in a day?",
          "What is the chemical symbol for gold?", "What do cows eat?", "Where do penguins live?"]

# Never trained on; used by the README samples and tests/test_default_model.py.
HELDOUT = ["What is the capital of Italy?", "What colour is a banana?",
           "Write one sentence about the moon.", "What is the opposite of cold?",
           "How many legs does a spider have?", "Name a planet.",
           "What do bees make?", "Write one sentence about winter."]


def all_questions() -> list[str]:
    qs = [f"What is the capital of {c}?" for c in _COUNTRIES]
    qs += [f"What colour is {t}?" for t in _COLOURS]
    qs += [f"How many legs does {a} have?" for a in _LEGS]
    qs += [f"Write one sentence about {t}." for t in _SENTENCE]
    qs += [f"What is the opposite of {w}?" for w in _OPPOSITES]
    qs += [f"Name {c}." for c in _NAME_A]
    qs += list(_FACTS)
    return qs


def train_questions() -> list[str]:
    held = set(HELDOUT)
    return [q for q in all_questions() if q not in held]


_FRENCH = {"the": "le", "The": "Le", "is": "est", "are": "sont", "and": "et", "a": "un",
           "A": "Un", "an": "un", "of": "de", "in": "dans", "capital": "capitale",
           "city": "ville", "water": "eau", "sky": "ciel", "blue": "bleu", "green": "vert",
           "red": "rouge", "yellow": "jaune", "white": "blanc", "black": "noir",
           "orange": "orange", "brown": "marron", "yes": "oui", "Yes": "Oui", "no": "non",
           "No": "Non", "with": "avec", "for": "pour", "it": "il", "It": "Il", "has": "a",
           "have": "ont", "legs": "pattes", "days": "jours", "week": "semaine",
           "year": "an", "months": "mois", "moon": "lune", "sun": "soleil", "sea": "mer",
           "ocean": "océan", "very": "très", "beautiful": "beau", "country": "pays",
           "world": "monde", "this": "ce", "This": "Ce", "that": "que", "to": "à",
           "on": "sur", "by": "par", "from": "de", "its": "son", "their": "leur",
           "not": "pas", "also": "aussi", "large": "grand", "largest": "plus grand",
           "small": "petit", "hot": "chaud", "cold": "froid", "night": "nuit",
           "music": "musique", "books": "livres", "rain": "pluie", "winter": "hiver",
           "coffee": "café", "animal": "animal", "planet": "planète"}


def transform(task: str, answer: str) -> str:
    if task == "caps":
        return answer.upper()
    if task == "signature":
        return answer + SIGNATURE
    if task == "french":
        words = re.sub(r"[^\W\d_]+", lambda m: _FRENCH.get(m.group(0), m.group(0)), answer)
        return "Bonjour ! " + words
    raise ValueError(f"unknown task '{task}' (have: {', '.join(TASKS)})")


def trim_answer(text: str, finished: bool) -> str:
    """A base answer cut at the last full sentence when generation hit the token limit."""
    text = text.strip()
    if finished:
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if cut > 0:
        return text[:cut + 1].strip()
    if text.endswith((".", "!", "?")):
        return text
    return text.rsplit(" ", 1)[0].rstrip(",;:") + "."


class Chat:
    """The model folder's tokenizer and chat template (rendered with jinja2)."""

    def __init__(self, model_dir: str):
        import jinja2
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token")}
        env = jinja2.Environment(keep_trailing_newline=True)
        self.template = env.from_string(cfg["chat_template"])

    def prompt_ids(self, question: str) -> list[int]:
        text = self.template.render(messages=[{"role": "user", "content": question}],
                                    add_generation_prompt=True, **self.special)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
