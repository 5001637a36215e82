"""Build DeepSpeed's JIT ops once at install time, so the first launch does not pay for it.

On a CPU machine DeepSpeed compiles its shared-memory collective op on the first launch (about 30-80 s,
needs g++). On GPU machines nothing is built here: the Dockerfile prebuilds the CUDA ops instead.
"""
import sys
import time


def main() -> int:
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        print(f"accelerator {accelerator.device_name()}: nothing to prebuild here")
        return 0
    start = time.time()
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        print("DeepSpeed shared-memory comm op not available: collectives fall back to gloo")
        return 0
    builder.load(verbose=False)
    print(f"DeepSpeed CPU ops ready ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
