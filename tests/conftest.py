"""Test-session settings shared by every test file."""

import torch

# `make test` runs two xdist workers on two cores: torch's default of one thread per core in each
# worker oversubscribes the machine and makes the suite several times slower.
torch.set_num_threads(1)
