"""One torch thread for the TCM tests: on a shared, oversubscribed CPU two OpenMP threads per process made a
tiny model's training step 20x slower (17 s vs 0.8 s measured), and these models are too small to gain
from a second thread anyway."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
