"""Continuous batching: the decode batch is re-formed between steps.

A fixed set of cache slots (rows of pre-allocated KV buffers, one per running sequence),
a waiting queue, and a scheduler that runs one step at a time (`cancel`, between steps,
frees a request's slots at once):

  1. move the sequences in the highest slots down into the slots freed below them;
  2. one forward pass over the live slots computes the next logits of every sequence that
     sampled a token in the previous step (on CUDA, a replayed CUDA graph: models/decode_graphs.py);
  3. admit waiting requests while slots and the step's token budget allow;
  4. prefill admitted prompts, in chunks of at most `prefill_chunk` tokens, within the budget,
     all of the step's chunks in one forward pass; a prompt is prefilled once and its cache
     copied into the slots of its n choices;
  5. sample one token for every decoding sequence, release text, retire finished ones.

The step ends with the sampling, so its tokens reach their clients before the next forward
pass, not after it (one decode step sooner: 1-4.5 ms on the CPU).

Each sequence draws from its own generator and only ever reads its own cache row, so its
tokens do not depend on who else is in the batch. `AsyncEngine` runs the scheduler on a
worker thread and hands each request an async iterator of events.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import torch

from models.decode_graphs import DecodeGraphs
from models.engine import (CompletionRequest, EndBans, Sequence, StreamEvent, TextEngine, TextRequests,
                           decode_mask, prompt_entries, prompt_events, sample_rows, score_logits)
from models.errors import InvalidParameter, is_int
from models.gpt import kv_cache_bytes
from models.sampling import SamplingBatch, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_running: int = 32  # sequences decoding at once (cache slots)
    max_tokens_per_step: int = 512  # decode tokens + prefill tokens per step
    prefill_chunk: int = 128  # longest piece of one prompt prefilled in a step
    max_waiting: int = 256  # queued requests beyond which check() and add() raise QueueFull
    cuda_graphs: bool = True  # on CUDA, replay the decode step as CUDA graphs (models/decode_graphs.py)
    # Turn on the model's batch-invariant mode: bit-identical logits whatever shares the batch
    # (CPU; slower: GPT.set_batch_invariant). False leaves the model as it is.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        # A chunk or budget of 0 would never prefill: requests would wait forever.
        for name, least in (("max_running", 1), ("max_tokens_per_step", 1), ("prefill_chunk", 1), ("max_waiting", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= {least}, got {value!r}")


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the caller should try again later (the service: 429)."""


class EngineStopped(RuntimeError):
    """The AsyncEngine has shut down: its requests in flight fail, new ones are refused."""


def check_request(requests: TextRequests, cfg: SchedulerConfig, req: CompletionRequest, waiting: int,
                  running: int, queued: list[int] | None = None) -> list[int]:
    """Return the prompt's ids; raise InvalidParameter for a request this model or scheduler
    cannot serve, QueueFull when the queue is full: the `waiting` requests not yet admitted that
    the free slots (`running` sequences hold the others) will not take at the next step reach
    `max_waiting`, and this one would wait too. Every request queues until the next step, so
    counting them all refused bursts that free slots would have taken at once, and with
    `max_waiting` 0 refused everything. `queued`: the n of the first waiting requests, in queue
    order, where known (the scheduler's own queue): the free slots take them as `_admit` does,
    whole requests in order; the others count a slot each, which lets up to n times as many
    requests of n choices wait."""
    prompt = requests.validate(req)
    if req.n > cfg.max_running:
        raise InvalidParameter("n", f"at most {cfg.max_running} choices on this server")
    free = max(0, cfg.max_running - running)
    if queued is None:
        if waiting >= cfg.max_waiting + free:
            raise queue_full(waiting, free, cfg.max_waiting)
        return prompt
    left, still_waiting = free, waiting
    for n in queued:
        if n > left:
            break
        left, still_waiting = left - n, still_waiting - 1
    else:  # the rest (on their way to the queue, n unknown here) take a slot each
        taken = min(waiting - len(queued), left)
        left, still_waiting = left - taken, still_waiting - taken
    if (still_waiting > 0 or req.n > left) and still_waiting >= cfg.max_waiting:
        raise queue_full(waiting, free, cfg.max_waiting)
    return prompt


def queue_full(waiting: int, free: int, max_waiting: int) -> QueueFull:
    """The refusal, with the limit: "requests waiting: 260" alone read as past a limit of 256."""
    return QueueFull(f"{waiting} requests waiting (free decode slots: {free}); at most {max_waiting} may wait "
                     f"beyond those the free slots take")


@dataclass
class _Group:
    """One request: its prompt and its n sequences, admitted together."""
    id: int
    req: CompletionRequest
    prompt: list[int]
    seqs: list[Sequence]
    prefilled: int = 0  # prompt tokens already in the cache
    queued_at: float = field(default_factory=time.perf_counter)
    # With prompt_logprobs: `score_logits` of the prompt's positions prefilled so far
    scores: tuple[list, list, list] = field(default_factory=lambda: ([], [], []))


def check_batch_invariance(engine: TextEngine) -> None:
    """Raise ValueError unless a request's logprobs come out bit for bit the same alone and in
    a batch of others on this machine, at its thread count. The exact mode rests on kernels
    rounding every block of one shape alike; how they round other shapes differs between CPUs,
    so the start-up checks the mode rather than assume it (a check of some shapes, not a proof
    for all: it passes the form of the mode that rounded GELU by how 3 threads split a 160-token
    prompt's tensor beside another, which the tests catch). The probe's prompt is 64 tokens where
    the context allows, short enough for a quick check (0.35 s for the `small` model on one
    thread, 18 s for a `gpt2-124m`-shaped one)."""
    most = max(1, engine.block_size // 4)  # tokens a request may make: even a tiny context holds them
    ids = engine.tokenizer.encode("Batch invariance. " * 50)[:min(64, engine.block_size - most)]
    probe = CompletionRequest("", prompt_ids=ids, seed=1, max_tokens=min(4, most), logprobs=0, ignore_eos=True,
                              sampling=SamplingParams(temperature=1.0))
    others = [CompletionRequest("a b" * i, seed=i, max_tokens=min(1 + i % 3, most), truncate=True, ignore_eos=True)
              for i in range(1, 13)]

    def trace(requests: list[CompletionRequest], at: int) -> list[tuple[int, float]]:
        return [(lp.token_id, lp.logprob) for lp in engine.complete(requests)[at].choices[0].logprobs]

    alone = trace([probe], 0)
    # First, inside and last, in batches of 2, 8 and 13 rows
    if any(trace(others[:before] + [probe] + others[before:before + after], before) != alone
           for before, after in ((0, 1), (3, 4), (12, 0))):
        raise ValueError(f"batch_invariant: on this machine, on {torch.get_num_threads()} thread(s), a request's "
                         "logprobs differ alone and in a batch (its CPU kernels round the exact mode's arithmetic "
                         "differently with the batch), so the mode cannot be offered here")


class ContinuousEngine:
    """Single-threaded scheduler over a TextEngine's model; call `step()` in a loop."""

    def __init__(self, engine: TextEngine, cfg: SchedulerConfig | None = None):
        self.engine = engine
        self.cfg = cfg or SchedulerConfig()
        self.model = engine.model
        self.device = engine.device
        if self.cfg.batch_invariant:
            if self.device.type != "cpu":
                raise ValueError("batch_invariant is for the CPU: GPU kernels round differently with the batch shape")
            self.model.set_batch_invariant()
            try:
                check_batch_invariance(engine)
            except ValueError:  # the model as it was, for a caller that goes on without the mode
                self.model.set_batch_invariant(False)
                raise
        try:
            self.model.setup_caches(self.cfg.max_running, engine.block_size)
        except RuntimeError as e:  # the allocator's own message gives bytes, not the setting behind them
            c, itemsize = self.model.config, self.model.lm_head.weight.element_size()
            gib = self.cfg.max_running * kv_cache_bytes(c.n_layer, c.n_embd, engine.block_size, itemsize) / 2**30
            raise ValueError(f"SchedulerConfig.max_running={self.cfg.max_running}: the KV cache for that many "
                             f"sequences of {engine.block_size} positions needs {gib:,.1f} GiB, which "
                             f"{self.device} could not allocate") from e
        self.caches = self.model.caches  # its slots; TextEngine.complete on the same model swaps in others
        self.graphs = (DecodeGraphs(self.model, self.cfg.max_running)
                       if self.cfg.cuda_graphs and self.device.type == "cuda" else None)
        vocab = self.model.config.vocab_size
        self.seen = torch.zeros(self.cfg.max_running, vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(self.cfg.max_running, vocab, device=self.device)  # of each completion's tokens
        self.pending = torch.zeros(self.cfg.max_running, vocab, device=self.device)  # next-token logits per slot
        self.free = list(range(self.cfg.max_running))  # a heap: lowest slot first keeps the batch compact
        self.waiting: deque[_Group] = deque()
        self.prefilling: list[_Group] = []
        self.decoding: dict[int, tuple[_Group, Sequence]] = {}  # slot -> sequence
        self.groups: dict[int, _Group] = {}
        self._ids = itertools.count()
        self.last_batch_size = 0  # sequences sampled in the latest step (tokens per step)
        self.on_admit = None  # optional callback(seconds the request waited, its prompt's tokens), for metrics
        self.end_bans = EndBans(engine.tokenizer.eot_id, self.device)
        self._batch_cache: tuple[list[tuple[Sequence, int]], tuple[torch.Tensor, SamplingBatch, int]] | None = None

    @property
    def num_running(self) -> int:
        return len(self.decoding) + sum(len(g.seqs) for g in self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def check(self, req: CompletionRequest, waiting: int = 0) -> list[int]:
        """The prompt's ids; InvalidParameter for a bad request, QueueFull when the queue is at its limit."""
        return check_request(self.engine, self.cfg, req, len(self.waiting) + waiting, self.num_running,
                             [group.req.n for group in self.waiting])

    def add(self, req: CompletionRequest, gid: int | None = None) -> int:
        """Check and queue a request; returns its id (events carry it as `request`)."""
        prompt = self.check(req)
        gid = next(self._ids) if gid is None else gid
        seqs = [Sequence.start(gid, req, c, self.engine.tokenizer, len(prompt)) for c in range(req.n)]
        group = _Group(gid, req, prompt, seqs)
        self.groups[gid] = group
        self.waiting.append(group)
        return gid

    def cancel(self, gid: int) -> None:
        """Forget a request; its slots are free before the next forward pass."""
        group = self.groups.get(gid)
        if group is None:
            return
        if group in self.waiting:
            self.waiting.remove(group)
        if group in self.prefilling:
            self.prefilling.remove(group)
        self._release(group)

    def _release(self, group: _Group) -> None:
        """Forget a request that is neither waiting nor prefilling any more, freeing its slots."""
        self.groups.pop(group.id, None)
        for seq in group.seqs:
            if seq.slot >= 0:  # prefilled or decoding
                self.decoding.pop(seq.slot, None)
                heapq.heappush(self.free, seq.slot)
                seq.slot = -1

    # --- one scheduler step ----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self.model.caches = self.caches  # another engine on this model may have swapped in its own
        self.last_batch_size = 0
        self._compact()
        self._forward()
        self._admit()
        self._prefill(self.cfg.max_tokens_per_step - len(self.decoding), events)  # the step's tokens left
        self._sample(events)
        return events

    def _admit(self) -> None:
        while self.waiting and len(self.free) >= self.waiting[0].req.n:
            group = self.waiting.popleft()
            if self.on_admit is not None:
                self.on_admit(time.perf_counter() - group.queued_at, len(group.prompt))
            sampling = group.req.sampling  # only penalised rows read `seen` and `counts`
            for seq in group.seqs:
                seq.slot = heapq.heappop(self.free)
                if sampling.repetition_penalty != 1:
                    self.seen[seq.slot] = False
                    self.seen[seq.slot, torch.tensor(group.prompt, device=self.device)] = True
                if sampling.presence_penalty or sampling.frequency_penalty:
                    self.counts[seq.slot] = 0
            self.prefilling.append(group)

    def _prefill(self, budget: int, events: list[StreamEvent]) -> None:
        """Prefill the next chunk of each prompt, in admission order and within the budget,
        all in one forward pass; a prompt done is handed to the decoding sequences."""
        chunks = self._plan_chunks(budget)
        if not chunks:
            return
        hidden, logits = self._prefill_pass(chunks)
        for i, (group, start, end) in enumerate(chunks):
            group.prefilled = end
            if group.req.prompt_logprobs:
                self._score_chunk(group, hidden[i], start, end)
            if end == len(group.prompt):
                self._finish_prefill(group, logits[i], events)

    def _plan_chunks(self, budget: int) -> list[tuple[_Group, int, int]]:
        """(group, start, end) of the prompt pieces this step prefills: at most `prefill_chunk`
        tokens of each prompt, in admission order, `budget` tokens in all."""
        chunks = []
        for group in self.prefilling:
            if budget <= 0:
                break
            start = group.prefilled
            end = min(len(group.prompt), start + self.cfg.prefill_chunk, start + budget)
            chunks.append((group, start, end))
            budget -= end - start
        return chunks

    def _prefill_pass(self, chunks: list[tuple[_Group, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass over the chunks, right-padded, each into its group's first slot:
        the hidden states (G, T, C) and the logits after each chunk's last token (G, V)."""
        T = max(end - start for _, start, end in chunks)
        last_slot = self.engine.block_size - 1
        idx = torch.zeros(len(chunks), T, dtype=torch.long)
        pos = torch.full((len(chunks), T), last_slot)  # padding writes where nothing is read yet
        for i, (group, start, end) in enumerate(chunks):
            idx[i, :end - start] = torch.tensor(group.prompt[start:end])
            pos[i, :end - start] = torch.arange(start, end)
        kv_len = max(end for _, _, end in chunks)
        idx, pos = idx.to(self.device), pos.to(self.device)
        mask = (torch.arange(kv_len, device=self.device) <= pos.unsqueeze(-1)).unsqueeze(1)  # (G, 1, T, kv)
        rows = torch.tensor([group.seqs[0].slot for group, _, _ in chunks], device=self.device)
        ends = torch.tensor([end - start - 1 for _, start, end in chunks], device=self.device)
        hidden = self.model.hidden_cached(idx, pos, mask, rows=rows, prompt_pass=True)  # (G, T, C)
        return hidden, self.model.logits(hidden[torch.arange(len(chunks), device=self.device), ends])

    def _finish_prefill(self, group: _Group, logits: torch.Tensor, events: list[StreamEvent]) -> None:
        """A prompt fully in the cache: its scored prompt (if asked for), then its choices
        decode from `logits`, the cache copied from its first slot into the others' (a request
        with max_tokens 0 is done)."""
        self.prefilling.remove(group)
        scored = (prompt_entries(self.engine.tokenizer, group.prompt, group.scores, group.req.logprobs or 0)
                  if group.req.prompt_logprobs else None)
        events += prompt_events(group.id, group.req, scored)
        if group.req.max_tokens == 0:  # nothing to generate
            self._release(group)
            return
        slot = group.seqs[0].slot
        for seq in group.seqs:
            if seq.slot != slot:
                self.model.copy_cache_row(slot, seq.slot, len(group.prompt))
            self.pending[seq.slot] = logits.float()
            self.decoding[seq.slot] = (group, seq)

    def _score_chunk(self, group: _Group, hidden: torch.Tensor, start: int, end: int) -> None:
        """Score the prompt tokens that this chunk's positions predict (position j, the token at
        j + 1), from the prefill pass's own hidden states: the vocabulary's logits for the
        chunk's positions only, never the whole prompt's at once."""
        n = min(end, len(group.prompt) - 1) - start  # the last prompt position predicts no prompt token
        if n <= 0:
            return
        targets = torch.tensor(group.prompt[start + 1:start + 1 + n], dtype=torch.long, device=self.device)
        for scores, chunk in zip(group.scores, score_logits(self.model.logits(hidden[:n]), targets,
                                                            group.req.logprobs or 0)):
            scores.extend(chunk)

    def _sample(self, events: list[StreamEvent]) -> None:
        if not self.decoding:
            return
        slots = sorted(self.decoding)
        rows = [self.decoding[s] for s in slots]
        index, params, want = self._batch_params(slots, rows)
        penalised, counted = "repetition_penalty" in params.uses, "counts" in params.uses  # only then read
        seen = self.seen.index_select(0, index) if penalised else None
        counts = self.counts.index_select(0, index) if counted else None
        seqs = [seq for _, seq in rows]
        tokens, lp = sample_rows(self.pending.index_select(0, index), params, seen, [s.random for s in seqs], want,
                                 counts, self.end_bans(seqs))
        if penalised:
            self.seen.index_copy_(0, index, seen)
        if counted:
            self.counts.index_copy_(0, index, counts)
        self.last_batch_size = len(slots)
        for j, ((group, seq), tok) in enumerate(zip(rows, tokens.tolist())):
            events.append(event := seq.accept(tok, lp, j, self.engine.tokenizer))
            if event.finish_reason is not None:  # finished: the slot is free for the next admission
                del self.decoding[seq.slot]
                heapq.heappush(self.free, seq.slot)
                seq.slot = -1
                if all(s.slot < 0 for s in group.seqs):
                    self.groups.pop(group.id, None)

    def _compact(self) -> None:
        """Move the sequences in the highest slots into the free slots below them, so that the
        decode step's rows [0, highest live slot] hold no free slot. A free slot in that range
        is a dummy row, which costs as much as a live one (a sequence left alone in slot 17
        would make a step of 18 rows; on a saturated trace a fifth to a third of the rows).
        Moving a sequence copies the cache positions it has written; its tokens do not change,
        since no row's computation depends on its slot."""
        while self.decoding and self.free and self.free[0] < max(self.decoding):
            src, dst = max(self.decoding), heapq.heappop(self.free)
            group, seq = self.decoding.pop(src)
            self.model.copy_cache_row(src, dst, seq.position - 1)  # its last token is written by the next pass
            self.seen[dst] = self.seen[src]
            self.counts[dst] = self.counts[src]
            seq.slot = dst
            self.decoding[dst] = (group, seq)
            heapq.heappush(self.free, src)

    def _batch_params(self, slots: list[int],
                      rows: list[tuple[_Group, Sequence]]) -> tuple[torch.Tensor, SamplingBatch, int]:
        """The decoding rows' slot index, sampling parameters and widest logprobs request, built
        again only when the rows change (a join, a leave, or a sequence moved to another slot by
        `_compact`): building them is a handful of host-to-device copies, which a
        sub-millisecond CUDA-graph step should not pay each time."""
        seqs = [(seq, slot) for (_, seq), slot in zip(rows, slots)]
        cached = self._batch_cache
        if cached is None or len(cached[0]) != len(seqs) or any(a is not b or i != j
                                                               for (a, i), (b, j) in zip(cached[0], seqs)):
            params = SamplingBatch.from_params([g.req.sampling for g, _ in rows], self.device)
            want = max((g.req.logprobs if g.req.logprobs is not None else -1) for g, _ in rows)
            cached = self._batch_cache = (seqs, (torch.tensor(slots, device=self.device), params, want))
        return cached[1]

    def _forward(self) -> None:
        """Next logits for every decoding slot, in one pass over slots [0, highest live slot].

        Slots in that range that are not decoding (mid-prefill; `_compact` leaves none free) ride
        along as dummies: they write at the last cache position, which no sequence reads before
        writing it itself.
        """
        if not self.decoding:
            return
        hi = max(self.decoding) + 1
        token_list, pos_list = [0] * hi, [self.engine.block_size - 1] * hi
        for slot, (_, seq) in self.decoding.items():
            token_list[slot], pos_list[slot] = seq.tokens[-1], seq.position - 1
        kv_len = max(seq.position for _, seq in self.decoding.values())
        if self.graphs is not None:
            logits = self.graphs(token_list, pos_list, kv_len)
        else:
            tokens = torch.tensor(token_list, device=self.device).unsqueeze(1)  # (hi, 1)
            pos = torch.tensor(pos_list, device=self.device).unsqueeze(1)  # (hi, 1)
            mask = decode_mask(pos_list, pos, kv_len)
            logits = self.model.forward_cached(tokens, pos, mask, rows=slice(0, hi))[:, -1].float()  # (hi, V)
        self.pending[:hi] = logits  # a dummy's row is set by its prefill before it is read


class EventStreams:
    """Each request's async iterator of events, fed from another thread (the scheduler's, or
    the reader of an engine process).

    Subclasses say how a request is checked, handed to the scheduler and cancelled; the events
    of a step reach each requester's event loop in one call."""

    def __init__(self) -> None:
        self._outboxes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()

    def check(self, req: CompletionRequest, ahead: int = 0) -> list[int]:
        """The prompt's ids; raises for a request that cannot run now (see `generate`), counting
        `ahead` requests about to queue before it."""
        raise NotImplementedError

    def _submit(self, gid: int, req: CompletionRequest) -> None:
        raise NotImplementedError

    def _cancel(self, gid: int) -> None:
        raise NotImplementedError

    def _gone(self) -> Exception | None:
        """Why no request can run any more (the engine died, or was shut down), else None."""
        return None

    async def generate(self, req: CompletionRequest, prompt: list[int] | None = None) -> AsyncIterator[StreamEvent]:
        """Yield the request's events until all its choices finish; leaving early cancels it.

        A bad request (InvalidParameter) or a full queue (QueueFull) raises before any event.
        `prompt`: the ids the caller's own `check` just returned for it. The scheduler is given
        the ids, not the text, so that it does not tokenize the prompt again between two decode
        steps (50 ms for a 100,000-character prompt, which every running sequence waited for).
        """
        if prompt is None:
            prompt = self.check(req)
        req = replace(req, prompt=req.prompt if req.echo else "", prompt_ids=prompt)  # the text: only to echo
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()
        gid = next(self._ids)
        self._outboxes[gid] = (loop, outbox)
        if (gone := self._gone()) is not None:  # since check(): the sweep of the outboxes may have missed it
            self._send(gid, gone)
        else:
            self._submit(gid, req)
        remaining = req.n
        try:
            while remaining:
                ev = await outbox.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.finish_reason is not None:
                    remaining -= 1
                yield ev
        finally:
            self._outboxes.pop(gid, None)
            if remaining:  # the client left (disconnect, deadline): free its slots
                self._cancel(gid)

    def _send(self, gid: int, item) -> None:
        target = self._outboxes.get(gid)
        if target is not None:
            self._hand_over(target[0], [(target[1], item)])

    def _send_events(self, events: list[StreamEvent]) -> None:
        """A step's events, handed to each event loop in one call: waking a loop from another
        thread costs a system call, and one per event was a visible share of a step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StreamEvent]]] = {}
        for ev in events:
            target = self._outboxes.get(ev.request)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], ev))
        for loop, items in by_loop.items():
            self._hand_over(loop, items)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
        """Put the items into their queues on the loop's own thread. A loop that was closed
        with requests still open (a thread or `asyncio.run` that ended without finishing them)
        takes nothing: its requests are dropped and cancelled, and the other loops still get
        their events (its RuntimeError must not stop the step's deliveries part-way, nor end the
        scheduler's thread)."""
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed
            for gid, (owner, _) in list(self._outboxes.items()):
                if owner is loop:
                    self._outboxes.pop(gid, None)
                    self._cancel(gid)


class AsyncEngine(EventStreams):
    """Runs a ContinuousEngine on a worker thread; each request gets an async iterator of events.

    New requests and cancellations reach the worker through a thread-safe inbox and are applied
    between steps: the scheduler stays single-threaded and the event loop never waits on a step.
    """

    def __init__(self, engine: ContinuousEngine):
        super().__init__()
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Requests put into the inbox and taken from it (each written by one thread): the
        # difference waits there; the inbox's size would count cancellations as waiting too.
        self._added = self._taken = 0
        self._wake = threading.Event()
        self._stopping = False
        self.on_step = None  # optional callback(batch_size, running, waiting), for metrics
        self._thread = threading.Thread(target=self._run, name="continuous-batching", daemon=True)
        self._thread.start()

    def check(self, req: CompletionRequest, ahead: int = 0) -> list[int]:
        if (gone := self._gone()) is not None:
            raise gone
        return self.engine.check(req, waiting=self._added - self._taken + ahead)

    def _gone(self) -> Exception | None:
        return EngineStopped("the engine has shut down") if self._stopping else None

    def _submit(self, gid: int, req: CompletionRequest) -> None:
        self._added += 1
        self._inbox.put(("add", gid, req))
        self._wake.set()

    def _cancel(self, gid: int) -> None:
        self._inbox.put(("cancel", gid, None))
        self._wake.set()

    def stats(self) -> tuple[int, int]:
        """(sequences running, requests waiting)."""
        return self.engine.num_running, self.engine.num_waiting + self._added - self._taken

    def shutdown(self) -> None:
        """Stop the scheduler; the requests in flight fail (nothing would feed them any more)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)
        for gid in list(self._outboxes):
            self._send(gid, EngineStopped("the engine has shut down"))

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            op, gid, req = self._inbox.get()
            if op == "cancel":
                self.engine.cancel(gid)
                continue
            self._taken += 1
            try:
                self.engine.add(req, gid)
            except Exception as e:  # InvalidParameter / QueueFull raced past check()
                self._send(gid, e)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work():
                self._report(0)  # cancellations can empty the batch without a step
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            in_flight = list(self.engine.groups)  # a failed step drops the final events of those it finished
            try:
                events = self.engine.step()
            except Exception as e:  # a bug must fail the requests in flight, not hang them
                for gid in in_flight:
                    self._send(gid, e)
                    self.engine.cancel(gid)
                continue
            self._report(self.engine.last_batch_size)  # counted before its clients hear of it
            self._send_events(events)

    def _report(self, batch_size: int) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(batch_size, *self.stats())
        except Exception:  # a failing metrics callback must not stop the scheduler, hanging every request
            logger.exception("the on_step callback of the continuous-batching engine failed")


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for outbox, ev in items:
        outbox.put_nowait(ev)
