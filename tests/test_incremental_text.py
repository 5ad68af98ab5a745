"""Streamed detokenization (serving.protocol.IncrementalText): the text streamed piece by
piece equals the whole output decoded at once, cut at the first stop string, for byte-level
BPE, SentencePiece-style and ids-as-text codecs; and each push decodes a window of a few
tokens, not the whole output."""

import random

import pytest
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer

from serving.protocol import IncrementalText, TextCodec

CORPUS = [f"the quick brown fox {i} jumps over naïve cafés: ünïcödé 日本語のテキスト 🙂 ok"
          for i in range(300)]


@pytest.fixture(scope="module")
def codecs():
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(CORPUS, vocab_size=500, show_progress=False)
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=300, show_progress=False)
    return {"byte-level": TextCodec(bl._tokenizer), "sentencepiece": TextCodec(sp._tokenizer),
            "ids": TextCodec()}


def outputs(codec: TextCodec, rng: random.Random):
    """Token sequences: encoded text (valid UTF-8), and random ids (byte-level pieces that
    split characters anywhere, special tokens, invalid bytes)."""
    vocab = codec.tokenizer.get_vocab_size() if codec.tokenizer else 1000
    for _ in range(60):
        if codec.tokenizer is not None:
            text = rng.choice(CORPUS)[rng.randrange(30):]
            yield codec.tokenizer.encode(text).ids
        yield [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]


def stream(codec, ids, stops, rng):
    it = IncrementalText(codec, stops)
    out, i = [], 0
    while i < len(ids) and not it.stopped:
        k = rng.randint(1, 4)                 # an engine output carries one or more tokens
        out.append(it.push(ids[i:i + k]))
        i += k
    out.append(it.flush())
    return "".join(out), it


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "ids"])
def test_streamed_text_is_the_whole_decode(codecs, name):
    codec, rng = codecs[name], random.Random()
    for ids in outputs(codec, rng):
        text, _ = stream(codec, ids, [], rng)
        assert text == codec.decode(ids), ids


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "ids"])
def test_streamed_text_stops_before_the_first_stop_string(codecs, name):
    codec, rng = codecs[name], random.Random()
    for ids in outputs(codec, rng):
        whole = codec.decode(ids)
        if len(whole) < 4:
            continue
        a = rng.randrange(len(whole) - 3)
        stops = [whole[a:a + rng.randint(1, 3)], "never there \x00"]   # one that occurs
        text, it = stream(codec, ids, stops, rng)
        cut = min(i for i in (whole.find(s) for s in stops) if i >= 0)
        assert text == whole[:cut] and it.stopped, (ids, stops)


def test_a_push_decodes_a_few_tokens_not_the_whole_output(codecs):
    """2000 tokens of text: no decode call sees more than a handful of ids."""
    seen = []

    class Counting(TextCodec):
        def decode(self, ids):
            seen.append(len(ids))
            return super().decode(ids)

    tok = codecs["byte-level"].tokenizer
    ids = (tok.encode(" ".join(CORPUS)).ids * 2)[:2000]
    codec = Counting(tok)
    it = IncrementalText(codec, ["zzz"])
    text = "".join(it.push([t]) for t in ids) + it.flush()
    assert text == tok.decode(ids) and len(ids) == 2000
    assert max(seen) <= 8
