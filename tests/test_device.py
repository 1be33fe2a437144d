import pytest
import torch

from framelm.device import resolve_device
from framelm.errors import FramelmError


@pytest.fixture
def no_cuda(monkeypatch):
    # Forced off, so the CPU-only behaviour holds on a GPU machine too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def four_gpus_rank2(monkeypatch):
    # Nothing here touches a GPU: resolve_device only asks how many there are.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    return monkeypatch


def test_auto_without_cuda_is_the_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_is_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_says_to_use_the_cpu(no_cuda, device):
    with pytest.raises(FramelmError, match="--device cpu"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "CUDA"])
def test_unknown_device_lists_the_choices(device):
    with pytest.raises(FramelmError, match=r"auto, cpu, cuda or cuda:N"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_auto_and_cuda_are_this_ranks_gpu(four_gpus_rank2, device):
    assert resolve_device(device) == torch.device("cuda", 2)


def test_more_ranks_than_gpus_is_refused(four_gpus_rank2):
    four_gpus_rank2.setenv("LOCAL_RANK", "6")
    with pytest.raises(FramelmError, match=r"LOCAL_RANK = 6 but this machine has 4 CUDA device.*--nproc_per_node=4"):
        resolve_device("auto")


def test_cuda_n_in_one_process_is_gpu_n(four_gpus_rank2):
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_cuda_n_under_multi_process_torchrun_is_this_ranks_gpu(four_gpus_rank2):
    four_gpus_rank2.setenv("WORLD_SIZE", "4")
    assert resolve_device("cuda:3") == torch.device("cuda", 2)


def test_cuda_n_past_the_last_gpu_is_refused(four_gpus_rank2):
    with pytest.raises(FramelmError, match=r"4 CUDA device\(s\), cuda:0 to cuda:3"):
        resolve_device("cuda:4")


def test_non_integer_local_rank_is_refused(four_gpus_rank2):
    four_gpus_rank2.setenv("LOCAL_RANK", "one")
    with pytest.raises(FramelmError, match="LOCAL_RANK = 'one' must be an integer"):
        resolve_device("auto")
