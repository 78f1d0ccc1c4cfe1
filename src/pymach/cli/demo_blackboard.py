"""`pymach demo blackboard`: Agora's shared blackboard (paper section 8.4), on three hosts.

"The blackboard physically resides on a multiprocessor host. [...] Agents use shared
memory to directly modify the blackboard. Message passing is used between loosely
coupled components of the system that collect data, perform low level signal
processing, and display results." A toy speech understanding system does just that on
an in-process `Network`: the board and its server are on host A, with two phoneme
agents and a word agent (shared memory); a signal agent on host B posts the segments
it hears, and a display on host C shows the board (messages). Every agent opens the
board the same way, and each says which path the library chose. At the end every agent
reads the whole board: all of them must see the same hypotheses in the same order, each
whole (a checksum in every segment).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from pymach.apps.blackboard import Blackboard, Hypothesis, server_stats, start_server
from pymach.net.network import Network

WAIT_MS = 30_000
UTTERANCE = [("k", 0.9), ("ae", 0.8), ("t", 0.85), ("s", 0.6), ("ae", 0.7), ("t", 0.9)]
WORDS: dict[tuple[str, ...], str] = {("k", "ae", "t"): "cat", ("s", "ae", "t"): "sat"}
Say = Callable[[str], Any]


def _segment(i: int, phoneme: str, energy: float) -> bytes:
    """A 'spectral frame': its label, some numbers, and a checksum over both."""
    body = f"{i}:{phoneme}:{energy}:".encode() + bytes((i * 37 + k) % 256 for k in range(48))
    return hashlib.sha256(body).digest()[:8] + body


def _whole(h: Hypothesis) -> bool:
    data = h.payload if isinstance(h.payload, bytes) else h.payload.encode()
    return h.kind != "segment" or hashlib.sha256(data[8:]).digest()[:8] == data[:8]


def _open(agent: str, say: Say) -> Blackboard:
    board = Blackboard.open("speech", agent=agent)
    say(f"[{agent}] path: {'shared memory' if board.local else 'messages'}")
    return board


def _until(board: Blackboard, done: Callable[[list[Hypothesis]], bool]) -> list[Hypothesis]:
    """Wait for hypotheses until `done(all so far)`; all of them."""
    seen: list[Hypothesis] = []
    while not done(seen):
        new = board.wait(seen[-1].seq + 1 if seen else 0, WAIT_MS)
        if not new:
            raise TimeoutError(f"{board.agent}: nothing new in {WAIT_MS} ms")
        seen += new
    return seen


def _word_posted(seen: list[Hypothesis]) -> bool:
    return sum(h.kind == "word" for h in seen) == len(WORDS)


def _finish(board: Blackboard) -> list[Hypothesis]:
    _until(board, _word_posted)
    everything = board.read()
    board.close()
    return everything


def _signal(say: Say) -> list[Hypothesis]:
    """Host B: low-level signal processing posts what it heard (messages)."""
    board = _open("signal", say)
    for i, (phoneme, energy) in enumerate(UTTERANCE):
        seq = board.post("segment", _segment(i, phoneme, energy), energy)
        say(f"[signal] posted segment {i} as hypothesis {seq}")
    return _finish(board)


def _phonemes(me: int, say: Say) -> list[Hypothesis]:
    """Host A: a phoneme agent takes every other segment and posts its phoneme."""
    agent = f"phonemes-{me}"
    board = _open(agent, say)
    done = 0
    seen: list[Hypothesis] = []
    while done < len(UTTERANCE) // 2:
        new = board.wait(seen[-1].seq + 1 if seen else 0, WAIT_MS)
        seen += new
        for h in new:
            if h.kind == "segment" and isinstance(h.payload, bytes):
                i, phoneme, _ = h.payload[8:].split(b":", 2)
                if int(i) % 2 == me - 1:
                    seq = board.post("phoneme", f"{int(i)}:{phoneme.decode()}",
                                     round(h.confidence * 0.9, 3))
                    say(f"[{agent}] segment {int(i)} sounds like /{phoneme.decode()}/ "
                        f"-> hypothesis {seq}")
                    done += 1
    return _finish(board)


def _words(say: Say) -> list[Hypothesis]:
    """Host A: the word agent waits for every phoneme and posts the words."""
    board = _open("words", say)
    seen = _until(board, lambda s: sum(h.kind == "phoneme" for h in s) == len(UTTERANCE))
    heard: dict[int, tuple[str, float]] = {}
    for h in seen:
        if h.kind == "phoneme" and isinstance(h.payload, str):
            i, phoneme = h.payload.split(":")
            heard[int(i)] = (phoneme, h.confidence)
    for at in range(0, len(UTTERANCE), 3):
        sounds = tuple(heard[i][0] for i in range(at, at + 3))
        confidence = round(min(heard[i][1] for i in range(at, at + 3)), 3)
        seq = board.post("word", WORDS.get(sounds, "?"), confidence)
        say(f"[words] /{' '.join(sounds)}/ is {WORDS.get(sounds, '?')!r} -> hypothesis {seq}")
    return _finish(board)


def _display(say: Say) -> list[Hypothesis]:
    """Host C: shows the board once the words are there (messages)."""
    board = _open("display", say)
    return _finish(board)


def _server_host(started: threading.Event, out: dict[str, Any], leave: threading.Event,
                 say: Say) -> None:
    """Host A's first task: start the server, keep it until the end, get its counts."""
    _, port = start_server()
    say("[A] the blackboard server runs on host A and checked in as 'blackboard'")
    started.set()
    leave.wait(WAIT_MS / 1000)
    out["stats"] = server_stats(port)


def run_blackboard_demo(deterministic: bool = False, seed: int = 0, trace: bool = False,
                        out: Callable[[str], Any] = print) -> None:
    """Run the narrated section 8.4 demo (multi-host runs use the free scheduler)."""
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out(line)

    say("-- a shared blackboard (paper 8.4): the board on host A; agents on A, B and C --")
    started, leave = threading.Event(), threading.Event()
    server_out: dict[str, Any] = {}
    with Network() as net:
        a, b, c = net.host("A", trace=trace), net.host("B"), net.host("C")
        server = a.start(_server_host, started, server_out, leave, say, name="server")
        if not started.wait(WAIT_MS / 1000):
            raise TimeoutError("the blackboard server did not start")
        agents = {"signal": b.start(_signal, say, name="signal"),
                  "phonemes-1": a.start(_phonemes, 1, say, name="phonemes-1"),
                  "phonemes-2": a.start(_phonemes, 2, say, name="phonemes-2"),
                  "words": a.start(_words, say, name="words"),
                  "display": c.start(_display, say, name="display")}
        boards = {name: h.wait(WAIT_MS) for name, h in agents.items()}
        leave.set()
        server.wait(WAIT_MS)
        packets = net.packets
        log = getattr(a.kernel, "trace_log", []) if trace is True else []
    _report(boards, server_out["stats"], packets, say)
    if log:
        say("\nhost A's kernel-manager messages (the boards' pages):\n" + "\n".join(
            str(line) for line in log if "kernel ->" in str(line) or "-> kernel" in str(line)))


def _report(boards: dict[str, list[Hypothesis]], stats: dict[str, int], packets: int,
            say: Say) -> None:
    board = boards["display"]
    say("\n[display] the board:")
    for h in board:
        shown = h.payload if isinstance(h.payload, str) else \
            f"/{h.payload[8:].split(b':')[1].decode()}/ (frame)"
        say(f"  {h.seq:3}  {h.kind:8} {shown:12} confidence {h.confidence:<5}  by "
            f"{h.poster}")
    same = all(seen == board for seen in boards.values())
    say(f"every reader saw the same {len(board)} hypotheses in the same order: "
        f"{'yes' if same else 'WRONG'}")
    whole = all(_whole(h) for seen in boards.values() for h in seen)
    say(f"checksums: {'all whole' if whole else 'WRONG: a torn hypothesis'}")
    say(f"server: {stats['reservations']} posts written into the board by agents on its "
        f"host, {stats['remote_posts']} remote posts and {stats['remote_reads']} remote "
        f"reads through messages, {stats['voided']} void; {packets} packets crossed the "
        f"network")
