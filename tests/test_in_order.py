"""settings.in_order: a combine's modules computed ahead on threads, one torch thread each, yielded in order."""
import threading
import time

import pytest
import torch

from engine_helpers import torch_threads_everywhere
from loraops import settings

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

CPU = torch.device("cpu")


class Watch:
    """run(item) that records, for each item, the thread it ran on and torch's count there, and how many items (and
    elements) ran at once."""

    def __init__(self, seconds: float = 0.02, together: tuple[int, ...] = ()):
        self.lock, self.seconds = threading.Lock(), seconds
        # (items that must run at once, whatever the machine's load: each waits for the others, up to 60 s)
        self.together = set(together)
        self.barrier = threading.Barrier(max(1, len(together)), timeout=60)
        self.running, self.elements = 0, 0
        self.most_running, self.most_elements = 0, 0
        self.seen: dict[int, tuple[str, int]] = {}

    def __call__(self, item: tuple[int, int]) -> int:
        index, size = item
        with self.lock:
            self.running, self.elements = self.running + 1, self.elements + size
            self.most_running = max(self.most_running, self.running)
            self.most_elements = max(self.most_elements, self.elements)
            self.seen[index] = (threading.current_thread().name, torch.get_num_threads())
        if index in self.together:
            self.barrier.wait()
        time.sleep(self.seconds)
        with self.lock:
            self.running, self.elements = self.running - 1, self.elements - size
        return index * 10


def test_items_run_ahead_on_one_thread_each_and_come_back_in_order(three_threads, monkeypatch):
    monkeypatch.setattr(settings, "AHEAD_ELEMENTS", 100)
    monkeypatch.setattr(settings, "ALONE_ELEMENTS", 60)
    items = [(0, 10), (1, 10), (2, 10), (3, 50), (4, 50), (5, 80), (6, 10), (7, 10)]
    watch = Watch(together=(0, 1, 2))
    assert list(settings.in_order(items, watch, lambda item: item[1], CPU)) == [i * 10 for i, _ in items]
    caller = threading.current_thread().name
    alone = {i for i, size in items if size > 60}
    assert all(watch.seen[i] == (caller, 3) for i in alone)  # in the caller, on all of torch's threads
    assert all(name != caller and count == 1 for i, (name, count) in watch.seen.items() if i not in alone)
    assert watch.most_running == 3  # as many at once as torch had threads (items 0-2: the barrier)
    assert watch.most_elements <= 100  # items 3 and 4 (50 each) together, never with a third
    assert torch_threads_everywhere() == (3, 3)


def test_a_failure_comes_back_in_its_place_and_what_had_not_started_never_starts(three_threads):
    started, done = [], []

    def run(index: int) -> int:
        started.append(index)
        if index == 2:
            raise ValueError("module 2")
        time.sleep(0.05)
        done.append(index)
        return index

    results = settings.in_order(range(20), run, lambda index: 1, CPU)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(ValueError, match="module 2"):
        next(results)
    time.sleep(0.2)
    assert max(started) <= 4  # 3 threads: 2 and the two after it at most, never the rest
    assert sorted(done) == [i for i in sorted(started) if i != 2]  # those running finished before it returned
    assert torch_threads_everywhere() == (3, 3)


def test_one_thread_or_a_gpu_runs_each_item_in_the_caller(three_threads):
    caller = threading.current_thread().name
    watch = Watch(0)
    with settings.torch_threads(CPU, lambda before: 1):
        assert list(settings.in_order([(0, 1), (1, 1)], watch, lambda item: item[1], CPU)) == [0, 10]
    watch2 = Watch(0)
    assert list(settings.in_order([(0, 1), (1, 1)], watch2, lambda item: item[1], torch.device("cuda"))) == [0, 10]
    assert {name for name, _ in [*watch.seen.values(), *watch2.seen.values()]} == {caller}
