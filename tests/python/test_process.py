"""flashjit inside a process's life: a fork while another thread is inside a
multi-threaded CPU call, and an exit while a daemon thread is inside one. Both
run in child processes (numpy inputs, no torch) under a time limit, so that a
hang or an abort fails the test instead of the suite."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cpu_only

# A call big enough to take a few milliseconds on two workers.
BUSY_CALL = textwrap.dedent("""
    import numpy as np
    import flashjit
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 512, 64)).astype(np.float32) for _ in range(3))
    def busy():
        o, lse = flashjit.attention(q, k, v, return_lse=True, num_threads=2)
        flashjit.attention_backward(q, k, v, o, lse, o, num_threads=2)
""")


def run_child(body, timeout=120):
    code = BUSY_CALL + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_is_in_a_pooled_call():
    # The child of each fork runs a pooled call of its own and must finish; a
    # pool lock copied in its locked state would leave it waiting forever.
    result = run_child("""
        import os, sys, threading, time
        stop = threading.Event()
        def loop():
            while not stop.is_set():
                busy()
        worker = threading.Thread(target=loop)
        worker.start()
        time.sleep(0.2)
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                busy()
                os._exit(0)
            deadline = time.time() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, status
                    break
                if time.time() > deadline:
                    os.kill(pid, 9)
                    stop.set()
                    worker.join()
                    print("forked child hung")
                    sys.exit(3)
                time.sleep(0.01)
        stop.set()
        worker.join()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize("how", ["return", "sys.exit", "os._exit"])
def test_exit_while_a_daemon_thread_is_in_a_pooled_call(how):
    result = run_child(f"""
        import os, sys, threading, time
        def loop():
            while True:
                busy()
        threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.3)
        print("exiting", flush=True)
        if "{how}" == "sys.exit":
            sys.exit(0)
        if "{how}" == "os._exit":
            os._exit(0)
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "terminate" not in result.stderr, result.stderr
    assert result.stdout.strip() == "exiting"
