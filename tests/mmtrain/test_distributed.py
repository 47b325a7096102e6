"""Leaving the process group: nothing that collectives produced may outlive it."""

import weakref

import torch.distributed as dist

from mmtrain import distributed


def test_cleanup_frees_unreachable_results_before_the_group_goes(monkeypatch):
    events = []

    class Result:      # stands in for a collective's output caught in a reference cycle (autograd graphs)
        pass
    result = Result()
    result.cycle = result
    weakref.finalize(result, events.append, "result freed")
    del result
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: events.append("group destroyed"))
    distributed.cleanup()
    assert events == ["result freed", "barrier", "group destroyed"]
