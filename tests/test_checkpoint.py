"""Tests for lsot_jax.checkpoint: roundtrip, paths, overwrite policy, corruption fallback and SIGKILL safety."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsot_jax.checkpoint import CheckpointError, StageCheckpointer, named_state, state_from_named, tree_checksum

# A failed Orbax/TensorStore read (the corruption tests) can leave a callback for an already-closed asyncio
# loop, reported later by the garbage collector in whichever test is running; it is harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(scale: float):
  params = {"enc": {"kernel": jnp.arange(12.0).reshape(3, 4) * scale, "bias": jnp.full((4,), scale)},
            "dec": {"kernel": jnp.linspace(-1.0, 1.0, 2000) * scale}}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.asarray(int(scale), jnp.int32)}


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _two_steps(directory):
  ckpt = StageCheckpointer(directory, max_to_keep=3)
  ckpt.save(1, _state(1.0), {"note": "one"})
  ckpt.save(2, _state(2.0), {"note": "two"})
  return ckpt


def test_roundtrip_preserves_values_structure_and_meta(tmp_path):
  state = _state(3.0)
  state["opt_state"] = optax.adam(1e-3).update(state["params"], state["opt_state"], state["params"])[1]
  with StageCheckpointer(tmp_path / "ck") as ckpt:
    ckpt.save(7, state, {"loss": 0.25, "history": [{"epoch": 1}]})
    assert ckpt.latest_step() == 7
  target = jax.tree.map(jnp.zeros_like, state)
  with StageCheckpointer(tmp_path / "ck") as ckpt:
    step, restored, meta = ckpt.restore(target)
  assert step == 7
  assert meta == {"loss": 0.25, "history": [{"epoch": 1}]}
  _assert_tree_equal(restored, state)
  assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Solver:
  h: jax.Array
  opt_state: optax.ScaleByAdamState


def test_named_state_keys_every_field_by_name_and_saves_and_restores_that_way(tmp_path):
  params = {"w": jnp.arange(3.0)}
  state = {"params": params, "opt_state": optax.named_chain(("adam", optax.scale_by_adam()),
                                                            ("learning_rate", optax.scale_by_learning_rate(0.1)))
           .init(params), "solver": _Solver(h=jnp.ones(2), opt_state=optax.scale_by_adam().init(jnp.ones(2)))}
  named = named_state(state)
  assert set(named["opt_state"]) == {"adam", "learning_rate"} and named["opt_state"]["learning_rate"] == {}
  assert set(named["opt_state"]["adam"]) == {"count", "mu", "nu"} and set(named["solver"]) == {"h", "opt_state"}
  assert set(named["solver"]["opt_state"]) == {"count", "mu", "nu"}
  with StageCheckpointer(tmp_path) as ckpt:
    ckpt.save(0, named)
    _, saved, _ = ckpt.restore(named_state(state))
  back = state_from_named(state, saved)
  _assert_tree_equal(back, state)
  assert isinstance(back["solver"], _Solver) and isinstance(back["opt_state"]["adam"], optax.ScaleByAdamState)
  with pytest.raises(KeyError, match="nu"):
    state_from_named(state, {**named, "solver": {"h": named["solver"]["h"],
                                                 "opt_state": {"count": 0, "mu": named["solver"]["h"]}}})


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with StageCheckpointer(os.path.join("runs", "ae")) as ckpt:
    assert ckpt.directory.is_absolute()
    assert ckpt.directory == tmp_path / "runs" / "ae"
    ckpt.save(0, _state(1.0))
  monkeypatch.chdir("/")
  with StageCheckpointer(tmp_path / "runs" / "ae") as ckpt:
    step, restored, _ = ckpt.restore(_state(0.0))
  assert step == 0
  _assert_tree_equal(restored, _state(1.0))
  assert not glob.glob(str(tmp_path / "runs" / "ae" / "*tmp*"))


def test_existing_step_is_not_silently_ignored(tmp_path):
  with StageCheckpointer(tmp_path) as ckpt:
    ckpt.save(5, _state(1.0), {"v": 1})
    with pytest.raises(ValueError, match="already exists"):
      ckpt.save(5, _state(2.0), {"v": 2})
    _, restored, meta = ckpt.restore(_state(0.0))
    assert meta == {"v": 1}
    _assert_tree_equal(restored, _state(1.0))
    ckpt.save(5, _state(2.0), {"v": 2}, overwrite=True)
    _, restored, meta = ckpt.restore(_state(0.0))
    assert meta == {"v": 2}
    _assert_tree_equal(restored, _state(2.0))


def test_max_to_keep(tmp_path):
  with StageCheckpointer(tmp_path, max_to_keep=2) as ckpt:
    for s in range(4):
      ckpt.save(s, _state(float(s)))
    assert ckpt.all_steps() == [2, 3]
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]


def test_bad_meta_and_step_raise(tmp_path):
  with StageCheckpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(0, _state(1.0), {"array": np.zeros(2)})
    with pytest.raises(ValueError, match="non-negative"):
      ckpt.save(-1, _state(1.0))
  with pytest.raises(ValueError):
    StageCheckpointer(tmp_path / "x", max_to_keep=0)


def _delete_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    os.remove(f)


def _truncate_data(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _truncate_meta(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path, "r+b") as fh:
    fh.truncate(5)


def _wrong_checksum(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path) as fh:
    meta = json.load(fh)
  meta["_lsot_state_sha256"] = tree_checksum(_state(5.0))
  with open(path, "w") as fh:
    json.dump(meta, fh)


@pytest.mark.parametrize("corrupt", [_delete_data, _truncate_data, _truncate_meta, _wrong_checksum])
def test_corrupt_latest_falls_back_to_previous(tmp_path, corrupt):
  _two_steps(tmp_path).close()
  corrupt(str(tmp_path / "2"))
  with StageCheckpointer(tmp_path) as ckpt:
    with pytest.warns(UserWarning, match=r"step 2 .* corrupt"):
      step, restored, meta = ckpt.restore(_state(0.0))
    assert step == 1 and meta == {"note": "one"}
    _assert_tree_equal(restored, _state(1.0))
    with pytest.raises(CheckpointError, match="step 2"):
      ckpt.restore(_state(0.0), step=2)


def test_target_of_gives_each_step_the_target_of_its_own_meta(tmp_path):
  """Step 1 holds a state by leaf position, step 2 the same state by name (a workdir resumed by a newer
  version); each step is restored in its own layout, also when the newer one is corrupt."""
  state = _state(1.0)
  positional = {f"leaf_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}
  with StageCheckpointer(tmp_path, max_to_keep=3) as ckpt:
    ckpt.save(1, positional, {"layout": "positional"})
    ckpt.save(2, state, {"layout": "named"})
  seen = []

  def target_of(meta):
    seen.append(meta)
    return jax.tree.map(jnp.zeros_like, state if meta.get("layout") == "named" else positional)

  with StageCheckpointer(tmp_path) as ckpt:
    step, restored, _ = ckpt.restore(target_of=target_of)
    assert step == 2 and seen == [{"layout": "named"}]
    _assert_tree_equal(restored, state)
    _delete_data(str(tmp_path / "2"))
    with pytest.warns(UserWarning, match=r"step 2 .* corrupt"):
      step, restored, meta = ckpt.restore(target_of=target_of)
    assert step == 1 and meta == {"layout": "positional"}
    _assert_tree_equal(restored, positional)
    with pytest.raises(ValueError, match="exactly one of target= and target_of="):
      ckpt.restore(state, target_of=target_of)
    with pytest.raises(ValueError, match="exactly one of target= and target_of="):
      ckpt.restore()


def test_all_corrupt_raises_naming_directory(tmp_path):
  _two_steps(tmp_path).close()
  _delete_data(str(tmp_path / "1"))
  _truncate_meta(str(tmp_path / "2"))
  with StageCheckpointer(tmp_path) as ckpt, pytest.warns(UserWarning):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
      ckpt.restore(_state(0.0))


def test_empty_directory_raises(tmp_path):
  with StageCheckpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(CheckpointError, match="no committed step"):
      ckpt.restore(_state(0.0))


def test_completion_marker(tmp_path):
  with StageCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(1, _state(1.0))
    assert not ckpt.is_complete()
    ckpt.save_final(2, _state(2.0), {"final": True})
    assert ckpt.is_complete()
    assert ckpt.completion() == {"step": 2, "meta": {"final": True}}
    with StageCheckpointer(tmp_path) as other:
      assert other.is_complete()
    ckpt.clear_complete()
    assert not ckpt.is_complete()
    ckpt.mark_complete(2)
    assert ckpt.is_complete()
    ckpt.save(3, _state(3.0))  # max_to_keep=1 deletes step 2: its marker no longer counts.
    assert not ckpt.is_complete()
    with pytest.raises(ValueError, match="not in"):
      ckpt.mark_complete(2)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from lsot_jax.checkpoint import StageCheckpointer
    ckpt = StageCheckpointer(sys.argv[1])
    state = {"w": jnp.arange(2_000_000, dtype=jnp.float32), "b": jnp.ones((3,), jnp.int32)}
    ckpt.save(4, state, {"done": "yes"})
    print("SAVED", flush=True)
    time.sleep(60)
""")


def test_sigkill_right_after_save_leaves_restorable_step(tmp_path):
  script = tmp_path / "saver.py"
  script.write_text(_KILL_SCRIPT)
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck")], stdout=subprocess.PIPE,
                          text=True)
  try:
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
  assert line.strip() == "SAVED"
  assert proc.returncode == -signal.SIGKILL
  target = {"w": jnp.zeros(2_000_000, jnp.float32), "b": jnp.zeros((3,), jnp.int32)}
  with StageCheckpointer(tmp_path / "ck") as ckpt:
    step, restored, meta = ckpt.restore(target)
  assert step == 4 and meta == {"done": "yes"}
  np.testing.assert_array_equal(restored["w"], np.arange(2_000_000, dtype=np.float32))
  np.testing.assert_array_equal(restored["b"], np.ones(3, np.int32))
