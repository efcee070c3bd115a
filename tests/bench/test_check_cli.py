"""`tumorsynth check gpu` refuses at once, naming the reason, where torch sees no CUDA device."""

import subprocess
import sys

from toolkit.mpi import clean_environment


def test_check_gpu_without_cuda_exits_nonzero_naming_the_reason():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on GPU machines too
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "check", "gpu"], capture_output=True, text=True,
                          env={**clean_environment(), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    assert "check gpu needs a CUDA device" in done.stderr
    assert "CPU-only build" in done.stderr or "no CUDA device" in done.stderr
