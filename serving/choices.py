"""A request's samples as the HTTP server sees them: each one's tokens, text and finish
reason; their engine streams merged in arrival order; and `best_of`'s choice among them
(each sample's seed: serving.requests.sample_seed)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from serving.engine import AsyncStream, Output
from serving.protocol import IncrementalText, TextCodec
from serving.requests import RequestError


class Choice:
    """One prompt's generation as the server sees it: tokens, text, finish reason."""

    def __init__(self, index: int, stream: AsyncStream, codec: TextCodec, stops: list[str]):
        self.index, self.stream = index, stream
        self.text = IncrementalText(codec, stops)
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.finish: str | None = None
        self.n_prompt = 0

    def take(self, out: Output) -> tuple[str, list[int], list[float]]:
        """Fold one engine output in; returns (new text, new ids, new logprobs)."""
        self.n_prompt = out.num_prompt_tokens or self.n_prompt
        ids, lps = out.token_ids, out.logprobs
        self.ids += ids
        self.lps += lps
        # A stop token (EOS) ends the text without appearing in it, as in vLLM.
        delta = self.text.push(ids[:-1] if out.finish_reason == "stop" else ids)
        if self.text.stopped:
            self.finish = "stop"
            self.stream.cancel()          # a stop string: free the pages now
        elif out.finish_reason is not None:
            delta += self.text.flush()    # which may still find a stop string
            self.finish = "stop" if self.text.stopped else out.finish_reason
        return delta, ids, lps


def best_of(choices: list[Choice], k: int, n: int) -> list[tuple[int, Choice]]:
    """Of each prompt's `k` samples (consecutive in `choices`), the `n` of highest
    cumulative log-probability, best first, with their response indices; all `k` in their
    order where `k == n`."""
    if k == n:
        return [(c.index, c) for c in choices]
    out = []
    for i in range(0, len(choices), k):
        ranked = sorted(choices[i:i + k], key=lambda c: -sum(c.lps))
        out += [(i // k * n + r, c) for r, c in enumerate(ranked[:n])]
    return out


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Output]]:
    """Outputs of several streams as they come; raises the first RequestError."""
    if len(choices) == 1:
        c = choices[0]
        async for out in c.stream:
            yield c, out
            if c.finish is not None:
                return
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for out in c.stream:
                await q.put((c, out))
        except RequestError as e:
            await q.put((c, e))
        await q.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        open_ = len(choices)
        while open_:
            c, item = await q.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, RequestError):
                raise item
            elif c.finish is None:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()
