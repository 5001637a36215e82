"""trainer.core.parallel's process-level lifecycle: groups are torn down before the interpreter is."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_process_groups_are_destroyed_at_exit_before_interpreter_teardown():
    # atexit runs handlers last-registered-first: the checker is registered before init_parallel, so it
    # runs after the trainer's own handler and sees what interpreter teardown would see.
    script = textwrap.dedent("""
        import atexit
        import torch.distributed as dist

        def check():
            from megatron.core import parallel_state
            print("initialized after exit handlers:", dist.is_initialized(),
                  parallel_state.model_parallel_is_initialized(), flush=True)

        atexit.register(check)
        from trainer.core.parallel import init_parallel, shutdown_parallel
        ctx = init_parallel(1)
        assert dist.is_initialized() and ctx.world_size == 1
        print("initialized during run:", dist.is_initialized(), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialized during run: True" in proc.stdout
    assert "initialized after exit handlers: False False" in proc.stdout, proc.stdout


def test_shutdown_twice_is_a_no_op():
    script = ("from trainer.core.parallel import init_parallel, shutdown_parallel\n"
              "init_parallel(1); shutdown_parallel(); shutdown_parallel(); print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
