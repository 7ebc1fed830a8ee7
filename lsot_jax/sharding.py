"""Beyond one device: the Brenier solver with its targets sharded over a mesh, data-parallel helpers and
multi-host start-up. Everything uses JAX's own machinery (``jax.sharding.Mesh``, ``NamedSharding``,
``jax.shard_map``, ``jax.distributed``); there is no home-made scheduler.

Sharded assignment. The codes y [n, d] and heights h [n] are split along a 1-D mesh axis; the source batch
x [M, d] is replicated. Each device runs the tiled kernel :func:`lsot_jax.kernels.assign` on its slice with
``axis_name`` set, and the kernel combines the slices with collectives at the points where it combines its
own tiles: for the default (CPU, ``"fused"``) method

    best  = pmax(best_local)                                  (u_h(x), the global max)
    band  = 16 eps (|x| pmax(max |y|) + pmax(max |h|))        (the tie band, from global target scales)
    idx   = pmin(lowest local index with score >= best - band, + shard offset)

and for ``"argmax"`` (GPU / TPU) ``idx = pmin(where(best_local == best, local argmax + offset, INT_MAX))``.
Each device then counts only the points whose cell it owns, so the histogram -- the gradient -- stays
sharded like h, and the Adam step is elementwise. The rest of the solver step (mean-centring, the
marginal-error sums) is partitioned by XLA's SPMD partitioner from the input shardings: its sums over cells
become all-reduces (psums).

Equality with one device. The kernel's tie rule -- the lowest index within a band of the GLOBAL max, the
band set by global target scales (``"fused"``), or the lowest index attaining the global max (``"argmax"``)
-- does not depend on the tiling or the sharding. So the sharded assignment equals the single-device one
with any tile size, the default included, whenever the matmuls round the scores alike (bit for bit in the
tests); otherwise it can differ only for a score within that rounding difference of the band's edge. A
Monte-Carlo solve is chaotic in such flips (one flipped sample changes a histogram by 1/M), but they need a
score within ~1e-7 relative of ``best - band``. Each solver step from a given state therefore equals the
single-device step to float tolerance (tested: Adam on whole runs, Newton step by step). Over a whole run, the partitioned sums
(Newton's conjugate gradient, the centring) round differently from one device's, and these ~1e-7 height
differences can flip a sample within a few steps (measured: at step 3 of a 7-step Newton solve on 8,192
samples); after that the sharded and single-device runs are two draws of the same algorithm, with the same
accuracy, not the same digits.

Uneven n. Shards must have equal size, so :func:`pad_problem` appends targets of weight 0 (code 0). The
solver already treats weight-0 targets as non-existent (height -1e30, excluded from the mean and the errors),
so the padded problem has the same solution; :func:`solve_sharded` cuts the padding off again.

Multi-host. Call :func:`initialize_distributed` on every host before any other JAX call; ``jax.devices()``
then lists the devices of all hosts and :func:`make_mesh` spans them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsot_jax import kernels
from lsot_jax import newton as newton_lib
from lsot_jax import solver as solver_lib

__all__ = [
    "DEFAULT_AXIS",
    "ShardedBrenierSolver",
    "ShardedNewtonSolver",
    "initialize_distributed",
    "make_mesh",
    "make_sharded_solver",
    "pad_problem",
    "pad_state",
    "place_state",
    "padded_size",
    "replicate",
    "resolve_axis",
    "shard_batch",
    "shard_problem",
    "sharded_assign",
    "sharded_cell_masses",
    "sharded_top_k",
    "solve_sharded",
    "unpad_state",
]

DEFAULT_AXIS = "devices"
_PAD_HEIGHT = kernels.MASKED_HEIGHT


def make_mesh(
    num_devices: Optional[int] = None,
    axis_name: str = DEFAULT_AXIS,
    devices: Optional[Sequence[Any]] = None,
) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all of them, on all hosts, by default).

  Args:
    num_devices: number of devices; all of ``devices`` if None.
    axis_name: name of the mesh axis.
    devices: devices to use; ``jax.devices()`` if None.

  Returns:
    ``Mesh`` of shape [num_devices] with axis ``axis_name``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}]; got {num_devices}.")
  return Mesh(np.asarray(devices[:num_devices]), (axis_name,))


def _axis(mesh: Mesh, axis_name: Optional[str]) -> str:
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          f"The mesh has axes {mesh.axis_names}; name the one to shard over with axis_name=."
      )
    return mesh.axis_names[0]
  if axis_name not in mesh.axis_names:
    raise ValueError(f"Axis {axis_name!r} is not in the mesh axes {mesh.axis_names}.")
  return axis_name


def resolve_axis(mesh: Mesh, axis_name: Optional[str] = None) -> str:
  """The mesh axis to shard over: ``axis_name`` (checked against the mesh), or the mesh's only axis."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"Expected a jax.sharding.Mesh; got {mesh!r}.")
  return _axis(mesh, axis_name)


def padded_size(n: int, num_shards: int) -> int:
  """Smallest multiple of ``num_shards`` that is >= n."""
  if n < 1 or num_shards < 1:
    raise ValueError(f"Need n >= 1 and num_shards >= 1; got {n}, {num_shards}.")
  return -(-n // num_shards) * num_shards


def _local_assign(x, y_loc, h_loc, *, axis_name, tile_size, row_chunk, method):
  """Per-device body: global (idx, best) of x against all shards, and this shard's offset.

  The shard_maps that call it set ``check_vma=False``: the kernel's tile scan starts from a device-invariant
  carry that becomes device-varying, which the checker rejects; the outputs declared replicated are
  replicated by construction (results of ``pmax`` / ``pmin``).
  """
  idx, best = kernels.assign(
      x, y_loc, h_loc, tile_size=tile_size, row_chunk=row_chunk, method=method, axis_name=axis_name
  )
  offset = jax.lax.axis_index(axis_name).astype(jnp.int32) * y_loc.shape[0]
  return idx, best, offset


def _check_inputs(mesh: Mesh, axis: str, x, y, h) -> int:
  if x.ndim != 2 or y.ndim != 2 or h.ndim != 1:
    raise ValueError(
        f"Expected x [M, d], y [n, d], h [n]; got {x.shape}, {y.shape}, {h.shape}."
    )
  if x.shape[1] != y.shape[1] or y.shape[0] != h.shape[0]:
    raise ValueError(f"Shape mismatch: x {x.shape}, y {y.shape}, h {h.shape}.")
  return mesh.shape[axis]


def _pad_targets(y: jax.Array, h: jax.Array, size: int) -> Tuple[jax.Array, jax.Array]:
  pad = size - y.shape[0]
  if pad == 0:
    return y, h
  return (
      jnp.pad(y, ((0, pad), (0, 0))),
      jnp.pad(h, (0, pad), constant_values=_PAD_HEIGHT),
  )


def sharded_assign(
    mesh: Mesh,
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    axis_name: Optional[str] = None,
    tile_size: int = 8192,
    row_chunk: int = 4096,
    method: kernels.Method = "auto",
) -> Tuple[jax.Array, jax.Array]:
  """:func:`lsot_jax.kernels.assign` with the targets sharded over a mesh axis.

  Any n works: the targets are padded internally (height -1e30) to a multiple of the axis size. Pure; jit
  it (the mesh is static): ``jax.jit(functools.partial(sharded_assign, mesh))(x, y, h)``.

  Args:
    mesh: the device mesh.
    x: Array of shape [M, d], source points (replicated).
    y: Array of shape [n, d], target codes (sharded).
    h: Array of shape [n], heights (sharded).
    axis_name: mesh axis to shard the targets over; the mesh's only axis if None.
    tile_size: targets per tile of the per-device kernel.
    row_chunk: source rows per chunk of the per-device kernel.
    method: kernel reduction (``"auto"``, ``"fused"``, ``"argmax"``).

  Returns:
    ``(idx, best)``: int32 array of shape [M], the lowest global index attaining the maximum score, and
    array of shape [M], the maximum score, both replicated.
  """
  axis = _axis(mesh, axis_name)
  shards = _check_inputs(mesh, axis, x, y, h)
  n = y.shape[0]
  y, h = _pad_targets(y, h, padded_size(n, shards))

  def body(x, y_loc, h_loc):
    idx, best, _ = _local_assign(
        x, y_loc, h_loc, axis_name=axis, tile_size=tile_size, row_chunk=row_chunk, method=method
    )
    return idx, best

  idx, best = jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(axis, None), P(axis)), out_specs=(P(), P()),
      check_vma=False,
  )(x, y, h)
  # The kernel's fallback index (see kernels) may be a padded target: keep it valid.
  return jnp.minimum(idx, n - 1), best


def sharded_cell_masses(
    mesh: Mesh,
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    *,
    axis_name: Optional[str] = None,
    tile_size: int = 8192,
    row_chunk: int = 4096,
    method: kernels.Method = "auto",
) -> Tuple[jax.Array, jax.Array]:
  """Batch cell masses (sharded like h) and potential values, the step of the sharded solver.

  Args:
    mesh: the device mesh.
    x: Array of shape [M, d], source batch (replicated).
    y: Array of shape [n, d], target codes; n must be a multiple of the axis size (see
      :func:`pad_problem`).
    h: Array of shape [n], heights.
    axis_name: mesh axis of the targets; the mesh's only axis if None.
    tile_size: targets per tile of the per-device kernel.
    row_chunk: source rows per chunk of the per-device kernel.
    method: kernel reduction.

  Returns:
    ``(w, best)``: array of shape [n] (sharded over ``axis_name``), the fraction of the batch in each
    cell, and array of shape [M] (replicated), ``u_h(x)``.
  """
  axis = _axis(mesh, axis_name)
  shards = _check_inputs(mesh, axis, x, y, h)
  if y.shape[0] % shards:
    raise ValueError(
        f"n = {y.shape[0]} targets do not split evenly over {shards} devices; pad the problem with "
        "pad_problem / shard_problem first."
    )
  m = x.shape[0]

  def body(x, y_loc, h_loc):
    n_loc = y_loc.shape[0]
    idx, best, offset = _local_assign(
        x, y_loc, h_loc, axis_name=axis, tile_size=tile_size, row_chunk=row_chunk, method=method
    )
    local = idx - offset
    mine = (local >= 0) & (local < n_loc)
    weights = jnp.where(mine, jnp.asarray(1.0 / m, jnp.float32), 0.0)
    w = jax.ops.segment_sum(weights, jnp.where(mine, local, 0), num_segments=n_loc)
    return w, best

  return jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(axis, None), P(axis)), out_specs=(P(axis), P()),
      check_vma=False,
  )(x, y, h)


def pad_problem(
    problem: solver_lib.SemidiscreteProblem, multiple: int
) -> solver_lib.SemidiscreteProblem:
  """Appends weight-0 targets (code 0) so that n is a multiple of ``multiple``.

  The solver never assigns mass to weight-0 targets and leaves them out of the mean-centring and the
  errors, so the padded problem has the same solution on the original targets.

  Args:
    problem: the problem, n targets.
    multiple: the number of shards.

  Returns:
    A problem with ``padded_size(n, multiple)`` targets; the first n are the original ones.
  """
  n = problem.num_targets
  pad = padded_size(n, multiple) - n
  if pad == 0:
    return problem
  return dataclasses.replace(
      problem,
      y=jnp.pad(problem.y, ((0, pad), (0, 0))),
      weights=jnp.pad(problem.weights, (0, pad)),
      representative=jnp.concatenate(
          [problem.representative, jnp.arange(n, n + pad, dtype=problem.representative.dtype)]
      ),
  )


def shard_problem(
    problem: solver_lib.SemidiscreteProblem, mesh: Mesh, axis_name: Optional[str] = None
) -> solver_lib.SemidiscreteProblem:
  """Pads the problem to the axis size and places it: per-target arrays sharded, the rest replicated.

  Args:
    problem: the problem.
    mesh: the device mesh.
    axis_name: mesh axis of the targets; the mesh's only axis if None.

  Returns:
    The padded problem (see :func:`pad_problem`) with ``NamedSharding`` placements.
  """
  axis = _axis(mesh, axis_name)
  padded = pad_problem(problem, mesh.shape[axis])
  targets = NamedSharding(mesh, P(axis))
  return dataclasses.replace(
      padded,
      y=jax.device_put(padded.y, NamedSharding(mesh, P(axis, None))),
      weights=jax.device_put(padded.weights, targets),
      representative=jax.device_put(padded.representative, targets),
      scale=jax.device_put(padded.scale, NamedSharding(mesh, P())),
      source=replicate(mesh, padded.source),
  )


def _check_mesh(owner: str, mesh: Any, axis_name: Optional[str]) -> None:
  """A sharded solver's mesh must be a ``Mesh`` with the named (or only) axis."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"{owner} needs mesh=jax.sharding.Mesh; got {mesh!r}.")
  _axis(mesh, axis_name)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedBrenierSolver(solver_lib.BrenierSolver):
  """:class:`lsot_jax.solver.BrenierSolver` whose assignment runs with the targets sharded over a mesh.

  Use it on a problem from :func:`shard_problem` (n a multiple of the axis size); everything else --
  ``init``, ``run``, ``output``, ``__call__``, the histories, resumption -- is the base solver's.

  Attributes:
    mesh: the device mesh (static).
    axis_name: mesh axis of the targets; the mesh's only axis if None (static).
  """

  mesh: Any = dataclasses.field(default=None, metadata=dict(static=True))
  axis_name: Optional[str] = dataclasses.field(default=None, metadata=dict(static=True))

  def __post_init__(self):
    super().__post_init__()
    _check_mesh("ShardedBrenierSolver", self.mesh, self.axis_name)

  def _cell_masses_and_potential(
      self, x: jax.Array, y: jax.Array, h: jax.Array
  ) -> Tuple[jax.Array, jax.Array]:
    return sharded_cell_masses(
        self.mesh, x, y, h, axis_name=self.axis_name, tile_size=self.tile_size,
        row_chunk=self.row_chunk, method=self.method,
    )


def sharded_top_k(
    mesh: Mesh,
    x: jax.Array,
    y: jax.Array,
    h: jax.Array,
    k: int,
    *,
    axis_name: Optional[str] = None,
    tile_size: int = kernels.TOPK_TILE,
    row_chunk: int = kernels.TOPK_ROW_CHUNK,
) -> Tuple[jax.Array, jax.Array]:
  """:func:`lsot_jax.kernels.top_k` with the targets sharded over a mesh axis (n a multiple of its size).

  Each device computes the top k of its shard; the kernel all-gathers the k candidates of every shard and
  keeps the global top k, so the result (replicated) equals the single-device one up to exact ties.

  Returns:
    ``(vals, idx)``: Arrays of shape [M, k], descending scores and global target indices.
  """
  axis = _axis(mesh, axis_name)
  shards = _check_inputs(mesh, axis, x, y, h)
  if y.shape[0] % shards:
    raise ValueError(f"n = {y.shape[0]} targets do not split evenly over {shards} devices; pad first.")
  body = lambda x, y_loc, h_loc: kernels.top_k(  # pylint: disable=unnecessary-lambda-assignment
      x, y_loc, h_loc, k, tile_size=tile_size, row_chunk=row_chunk, axis_name=axis)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis, None), P(axis)), out_specs=(P(), P()),
                       check_vma=False)(x, y, h)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardedNewtonSolver(newton_lib.NewtonSolver):
  """:class:`lsot_jax.newton.NewtonSolver` whose passes run with the targets sharded over a mesh.

  The top-k, the assignment and the deficits run per shard with collectives (:func:`sharded_top_k`,
  :func:`sharded_assign`); the counts, the Hessian edge list (global indices) and the conjugate-gradient
  solve are small and left to XLA's partitioner. Use it on a problem from :func:`shard_problem`.

  Attributes:
    mesh: the device mesh (static).
    axis_name: mesh axis of the targets; the mesh's only axis if None (static).
  """

  mesh: Any = dataclasses.field(default=None, metadata=dict(static=True))
  axis_name: Optional[str] = dataclasses.field(default=None, metadata=dict(static=True))

  def __post_init__(self):
    super().__post_init__()
    _check_mesh("ShardedNewtonSolver", self.mesh, self.axis_name)

  def _top_k_cells(self, x, y, h):
    return sharded_top_k(self.mesh, x, y, h, self.top_k, axis_name=self.axis_name, tile_size=self.tile_size,
                         row_chunk=self.top_k_row_chunk)

  def _assign(self, x, y, h):
    return sharded_assign(self.mesh, x, y, h, axis_name=self.axis_name, tile_size=self.tile_size,
                          row_chunk=self.row_chunk, method=self.method)

  def _column_max_gap(self, x, y, h, best):
    axis = _axis(self.mesh, self.axis_name)
    body = lambda x, y_loc, h_loc, best: kernels.column_max_gap(  # pylint: disable=unnecessary-lambda-assignment
        x, y_loc, h_loc, best, tile_size=self.tile_size, row_chunk=self.top_k_row_chunk)
    return jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(axis, None), P(axis), P()),
                         out_specs=P(axis), check_vma=False)(x, y, h, best)


def make_sharded_solver(solver: Any, mesh: Mesh, axis_name: Optional[str] = None) -> Any:
  """The sharded twin of a solver (Adam or Newton): same hyperparameters, passes sharded over ``mesh``."""
  if isinstance(solver, newton_lib.NewtonSolver):
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(newton_lib.NewtonSolver)}
    return ShardedNewtonSolver(mesh=mesh, axis_name=axis_name, **fields)
  fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver_lib.BrenierSolver)}
  return ShardedBrenierSolver(mesh=mesh, axis_name=axis_name, **fields)


def _resize_cells(state: Any, fn) -> Any:
  if isinstance(state, newton_lib.NewtonState):
    return dataclasses.replace(state, h=fn(state.h), h_iter=fn(state.h_iter), counts=fn(state.counts))
  return dataclasses.replace(
      state,
      h=fn(state.h),
      window_hist=fn(state.window_hist),
      opt_state=jax.tree.map(lambda a: fn(a) if jnp.ndim(a) >= 1 else a, state.opt_state),
  )


def unpad_state(state: Any, n: int) -> Any:
  """Cuts the per-target arrays of a padded solver state (Adam: h, moments, window histogram; Newton: h,
  h_iter, counts) to n."""
  return _resize_cells(state, lambda a: a[:n])


def pad_state(state: Any, size: int) -> Any:
  """Zero-pads the per-target arrays of a solver state to ``size`` (to resume a run on a padded problem)."""
  return _resize_cells(state, lambda a: jnp.pad(a, (0, size - a.shape[0])))


def place_state(state: Any, mesh: Mesh) -> Any:
  """Puts a padded solver state on the mesh: per-cell arrays sharded like the codes, the rest replicated.

  Args:
    state: a :class:`lsot_jax.solver.SolverState` or :class:`lsot_jax.newton.NewtonState` padded to a
      multiple of the mesh size (:func:`pad_state`).
    mesh: the 1-D device mesh of the targets.

  Returns:
    The same state, placed.
  """
  whole = NamedSharding(mesh, P())
  cells = NamedSharding(mesh, P(mesh.axis_names[0]))
  placed = jax.device_put(state, whole)
  per_cell = lambda a: jax.device_put(a, cells if jnp.ndim(a) else whole)  # pylint: disable=unnecessary-lambda-assignment
  if isinstance(state, newton_lib.NewtonState):
    return dataclasses.replace(placed, h=per_cell(state.h), h_iter=per_cell(state.h_iter),
                               counts=per_cell(state.counts))
  return dataclasses.replace(placed, h=per_cell(state.h), window_hist=per_cell(state.window_hist),
                             opt_state=jax.tree.map(per_cell, state.opt_state))


def solve_sharded(
    rng: jax.Array,
    problem: solver_lib.SemidiscreteProblem,
    solver: Any,
    mesh: Mesh,
    h_init: Optional[jax.Array] = None,
    *,
    axis_name: Optional[str] = None,
) -> Tuple[solver_lib.BrenierPotential, solver_lib.SolverState]:
  """Solves ``problem`` with the targets sharded over ``mesh``, like ``jax.jit(solver)(rng, problem)``.

  Same keys and hyperparameters as the single-device solver, ``jax.jit(solver)(rng, problem, h_init)``; each
  step equals its step to float tolerance, and a whole run matches it until rounding flips a sample on a
  facet, then matches it in accuracy only (see the module docstring).

  Pads, places and jits internally (an entry point, like ``launch.py``'s stages); the returned potential
  and state have the original n targets and live on the mesh's devices.

  Args:
    rng: PRNG key of the run (same keys per step as the single-device solver).
    problem: the problem, any n.
    solver: the solver's hyperparameters.
    mesh: the device mesh.
    h_init: optional initial heights of shape [n].
    axis_name: mesh axis of the targets; the mesh's only axis if None.

  Returns:
    ``(potential, state)`` as :meth:`BrenierSolver.__call__`.
  """
  n = problem.num_targets
  sharded = make_sharded_solver(solver, mesh, axis_name)
  padded = shard_problem(problem, mesh, axis_name)
  if h_init is not None:
    if h_init.shape != (n,):
      raise ValueError(f"h_init must have shape ({n},); got {h_init.shape}.")
    h_init = jnp.pad(h_init, (0, padded.num_targets - n))
  _, state = jax.jit(sharded)(rng, padded, h_init)
  state = unpad_state(state, n)
  return solver.output(problem, state), state


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places every array leaf of ``tree`` on all devices of ``mesh`` (e.g. model parameters)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def shard_batch(mesh: Mesh, batch: Any, axis_name: Optional[str] = None) -> Any:
  """Splits every array leaf of ``batch`` along its first axis over the mesh (data parallelism).

  A jitted step applied to a sharded batch and :func:`replicate`-d parameters runs data-parallel: XLA
  partitions the forward and backward passes by the batch and all-reduces the gradients.

  Args:
    mesh: the device mesh.
    batch: pytree of arrays with a common leading batch dimension B, a multiple of the axis size.
    axis_name: mesh axis to split over; the mesh's only axis if None.

  Returns:
    The batch with ``NamedSharding(mesh, P(axis_name))`` placements.
  """
  axis = _axis(mesh, axis_name)
  shards = mesh.shape[axis]

  def put(a):
    if np.ndim(a) == 0 or np.shape(a)[0] % shards:
      raise ValueError(
          f"Batch leaves need a leading dimension divisible by {shards} devices; got shape "
          f"{np.shape(a)}. Drop or pad the last partial batch."
      )
    return jax.device_put(a, NamedSharding(mesh, P(axis)))

  return jax.tree.map(put, batch)


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
) -> bool:
  """Starts multi-host JAX (a thin wrapper over ``jax.distributed.initialize``).

  Call it on every host, before any other JAX call, with the same ``coordinator_address`` (``host:port``
  of process 0) and ``num_processes`` and each host's own ``process_id``. On TPU pods and SLURM / Open MPI
  clusters all three may be None: JAX detects them. Afterwards ``jax.devices()`` lists every host's devices,
  so :func:`make_mesh` spans them all; feed each host's data with ``jax.make_array_from_process_local_data``.
  A single process (``num_processes`` 1, or all arguments None outside a detected cluster) needs no call.

  Args:
    coordinator_address: ``"host:port"`` of the coordinator (process 0).
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: devices this process uses (default: all local ones).

  Returns:
    True if ``jax.distributed.initialize`` was called, False for a single process (``num_processes == 1``).
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1; got {num_processes}.")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}); got {process_id}.")
  if num_processes == 1:
    return False
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
  )
  return True
