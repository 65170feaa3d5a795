"""This process's place under torchrun: one process without it, and clear --device errors."""

from __future__ import annotations

import pytest
import torch

from lmloss.train.processes import Processes, start_processes


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs, device = start_processes("cpu")
    assert procs == Processes() and procs.main and procs.world == 1 and device == torch.device("cpu")
    value = torch.tensor([1.5, 2.0])
    assert procs.sum(value) is value  # nothing to add
    procs.barrier()


@pytest.mark.parametrize(
    "option, message",
    [
        ("meta", "--device 'meta': lmloss train runs on cpu or cuda"),
        ("not-a-device", "--device 'not-a-device' is not a device"),
        ("cuda", "--device cuda: no CUDA device is available"),
    ],
)
def test_bad_device_names_the_option(monkeypatch, option, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        start_processes(option)
