"""The main-guard trap: a plain script that starts a local cluster without
``if __name__ == "__main__":`` is stopped in a few lines that say what to add."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from smd_dist.store import ActivationStore


def run_script(path, text, timeout=300):
    path.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=timeout, cwd=path.parent)


def test_the_call_site_is_found_outside_the_guard_and_not_under_it(tmp_path):
    out = run_script(tmp_path / "probe.py", """\
        from smd_dist.engine.clusters import unguarded_main_call

        def probe():
            return unguarded_main_call()

        top = probe()
        if __name__ == "__main__":
            inside = probe()
            if True:
                nested = probe()
            print(top[1], inside, nested)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "None", "None"]


@pytest.mark.slow
def test_an_unguarded_script_fails_in_a_few_lines_and_a_guarded_one_runs(tmp_path):
    rng = np.random.default_rng(0)
    store = ActivationStore(tmp_path / "store", mode="a")
    for layer in ("a", "b", "c"):
        store.write("net", layer, rng.standard_normal((20, 4)))
    call = (
        f"ds = smd_dist.compute_distances({str(store.path)!r}, output='out', progress=False, "
        "cluster={'kind': 'local', 'n-workers': 1, 'threads-per-worker': 1})\n"
    )
    plain = run_script(tmp_path / "plain.py", "import smd_dist\n\n" + call + "print('done')\n")
    assert plain.returncode != 0
    lines = (plain.stdout + plain.stderr).splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    assert sum("Traceback" in line for line in lines) == 1
    assert "MainGuardError: plain.py, line 3" in plain.stderr
    assert 'if __name__ == "__main__":' in plain.stderr
    assert not (tmp_path / "out").exists()
    guarded = run_script(
        tmp_path / "guarded.py",
        "import smd_dist\n\nif __name__ == '__main__':\n    " + call + "    print('done')\n",
    )
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "done" and guarded.stderr == ""
