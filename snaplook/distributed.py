"""Embedding on a Ray cluster (Ray Data): checkpoint batches go to an actor pool, one model
per actor, and come back to the caller, which checkpoints them and writes the shards.

Used by :func:`snaplook.index.build_index` with ``engine="ray"``; the index it writes is the
same as the local engine's (same rows, same order, features equal to 1e-6).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snaplook.errors import SnaplookError
from snaplook.options import DEFAULT_CPUS_PER_WORKER, DEFAULT_GPUS_PER_WORKER

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

#: Passes over the batches still missing after a pass (an actor that died and could not
#: be restarted, a lost block); each pass keeps what the previous ones finished.
DEFAULT_ATTEMPTS = 3
#: Blocks (tasks) per pass: beyond it a block holds several batches (10 M images in
#: batches of 32 are 32 batches, about 1,000 images, per block).
MAX_BLOCKS = 10_000

#: Called once per finished batch: (batch number, features (n_ok, d) float32 raw,
#: [(position in batch, width, height)] per embedded image, [(position, reason)] per skip).
OnBatch = Callable[[int, "np.ndarray", list[Any], list[Any]], None]


@dataclass
class RayEngine:
    """Where and how to embed on Ray.

    Args:
        address: a running cluster (``ray start --head`` prints it, e.g. "10.0.0.5:6379",
            or "auto"); None starts a local cluster on this machine for the run.
        workers: actors in the pool, each holding one model; default: as many as the
            cluster's CPUs (or GPUs, with ``gpus_per_worker``) allow.
        cpus_per_worker: CPUs reserved per actor, default=1; the model uses that many
            threads.
        gpus_per_worker: GPUs per actor, default=0 (fractions share a GPU).
        attempts: passes over still-missing batches before giving up, default=3.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER
    gpus_per_worker: float = DEFAULT_GPUS_PER_WORKER
    attempts: int = DEFAULT_ATTEMPTS

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise SnaplookError(f"--workers must be at least 1, got {self.workers}.")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise SnaplookError(
                f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got "
                f"{self.cpus_per_worker} and {self.gpus_per_worker}."
            )

    def embed_batches(
        self,
        batches: dict[int, list[str]],
        embedder: Any,
        *,
        on_batch: OnBatch,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        """Embed each batch (a list of image paths) on the cluster; report it to ``on_batch``.

        A batch is embedded as one forward pass, as the local engine does, so both see the
        same network batches. ``on_batch`` is called in the driver, once per batch, in the
        order batches finish; a batch that comes back twice (a retried task) is reported
        once.

        Raises:
            SnaplookError: Ray is not installed, the cluster cannot be reached, a worker
                fails the same way on every attempt, or batches are still missing after
                ``attempts`` passes (finished batches have been reported).
            KeyboardInterrupt: ``interrupted()`` turned true; finished batches were reported.
        """
        ray = _import_ray()
        started = _connect(ray, self.address)
        try:
            remaining = dict(batches)
            error = ""
            for attempt in range(1, self.attempts + 1):
                try:
                    error = self._run(ray, remaining, embedder, on_batch, interrupted)
                except ray.exceptions.RayError as exc:
                    cause = _user_error(exc)
                    if cause is not None:
                        raise cause from exc
                    # Only the text: the exception would keep the failed run's actors alive.
                    error = _first_line(exc)
                gc.collect()
                if not remaining:
                    return
                logger.warning(
                    "ray: %d of %d batches are missing after attempt %d of %d (%s); retrying them.",
                    len(remaining),
                    len(batches),
                    attempt,
                    self.attempts,
                    error or "lost",
                )
            raise SnaplookError(
                f"ray: {len(remaining)} of {len(batches)} batches failed after {self.attempts} "
                f"attempts ({error or 'lost'}); the finished ones are checkpointed: fix the "
                "cause and run the same command again to resume."
            )
        finally:
            if started:
                ray.shutdown()

    def _run(
        self,
        ray: Any,
        remaining: dict[int, list[str]],
        embedder: Any,
        on_batch: OnBatch,
        interrupted: Callable[[], bool],
    ) -> str:
        """One pass over ``remaining`` (finished batches are removed); the first error."""
        import numpy as np

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        workers = self.workers or self._default_workers(ray)
        items = [{"batch": b, "paths": json.dumps(p)} for b, p in sorted(remaining.items())]
        # A block is a task: its batches come back (and are checkpointed) together, and a
        # dead worker's block is redone whole. One batch per block up to MAX_BLOCKS.
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
        # The embedder (settings only, no model) travels inside the worker class, which Ray
        # serialises by value to start its actors, process to process (never to disk); not
        # as constructor arguments in the object store, which a restarted actor could find
        # gone.
        worker = type(
            "EmbedWorker",
            (_EmbedWorker,),
            {"template": _unloaded(embedder), "threads": max(1, int(self.cpus_per_worker))},
        )
        results = dataset.map_batches(
            worker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None,
        )
        error = user_error = ""
        for row in results.iter_rows():
            b = int(row["batch"])
            if b not in remaining:
                continue  # a retried task whose first attempt also came back
            done = json.loads(row["result"])
            if "error" in done:
                if done["user"]:
                    user_error = done["error"]
                    break  # leaving the loop closes the iterator and stops the actors
                error = error or f"batch {b}: {done['error']}"
                continue
            features = np.frombuffer(row["features"], dtype=np.float32)
            if done["rows"]:
                features = features.reshape(len(done["rows"]), -1)
            on_batch(b, features, done["rows"], done["skipped"])
            del remaining[b]
            if interrupted():
                raise KeyboardInterrupt
        if user_error:
            del results, dataset
            gc.collect()
            raise SnaplookError(user_error)
        return error

    def _default_workers(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))


class _EmbedWorker:
    """A Ray Data actor: loads the model once (on its first batch), embeds batches.

    ``template`` (the embedder, without its model) and ``threads`` are set on a subclass
    made per run.
    """

    template: Any = None
    threads: int = 1

    def __init__(self) -> None:
        import copy

        from snaplook import runtime
        from snaplook.features import embedder_runtime

        threads = self.threads
        # The model would use a thread per core of the machine, as many times as there
        # are actors on it; an actor uses the CPUs it reserved.
        runtime.cpu_threads = lambda: threads
        self.embedder = copy.copy(self.template)
        if embedder_runtime(self.embedder) == "keras":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        out: dict[str, list[Any]] = {"batch": [], "features": [], "result": []}
        for b, paths_json in zip(batch["batch"], batch["paths"]):
            # A failure comes back as a row: raising would abort the whole dataset and
            # leave its actors holding their CPUs while the driver retries.
            features = np.zeros((0,), dtype=np.float32)
            try:
                features, rows, skipped = _embed_one_batch(json.loads(paths_json), self.embedder)
                result: dict[str, Any] = {"rows": rows, "skipped": skipped}
            except SnaplookError as exc:  # the user's to fix: weights, ...
                result = {"error": str(exc), "user": True}
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}", "user": False}
            out["batch"].append(int(b))
            out["features"].append(features.astype(np.float32).tobytes())
            out["result"].append(json.dumps(result))
        return {
            "batch": np.array(out["batch"], dtype=np.int64),
            "features": np.array(out["features"], dtype=object),
            "result": np.array(out["result"], dtype=object),
        }


def _embed_one_batch(
    paths: list[str], embedder: Any
) -> tuple[np.ndarray, list[list[int]], list[list[Any]]]:
    """One forward pass over ``paths`` (as the local engine batches them); skips listed."""
    import numpy as np

    from snaplook.features import iter_embeddings

    position = {str(Path(p)): i for i, p in enumerate(paths)}
    skipped: list[list[Any]] = []
    rows: list[list[int]] = []
    parts: list[np.ndarray] = []
    for done in iter_embeddings(
        paths,
        embedder,
        batch_size=max(1, len(paths)),
        on_skip=lambda s: skipped.append([position[str(Path(s.path))], s.reason]),
    ):
        rows.extend([position[str(p)], int(w), int(h)] for p, (w, h) in zip(done.paths, done.sizes))
        parts.append(np.asarray(done.features, dtype=np.float32))
    features = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return features, rows, skipped


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pandas: the "ray[data]" extra)
    except ImportError as exc:
        raise SnaplookError(
            f"--engine ray needs Ray Data ({exc}); install it with "
            "`pip install 'snaplook[ray]'` (or `pip install 'ray[data]'`)."
        ) from exc
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` or start a local cluster; True when this call started Ray."""
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address is None:
        # "local": a fresh cluster for this run, never someone's `ray start` on this
        # machine. Its workers import this snaplook, not another copy on the default path.
        package_parent = str(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
        )
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": python_path}}
        address = "local"
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SnaplookError(
            f"cannot reach the Ray cluster at {address!r} ({_first_line(exc)}); start one "
            "with `ray start --head` and pass the address it prints, or drop --address."
        ) from exc
    return True


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT nothing listens on at once: Ray itself waits minutes for it."""
    import socket

    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SnaplookError(
            f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); start one "
            "with `ray start --head` and pass the address it prints, or drop --address."
        ) from exc


def _unloaded(embedder: Any) -> Any:
    """A copy of ``embedder`` without its loaded model: what travels to the actors."""
    import copy

    clone = copy.copy(embedder)
    state = vars(clone)
    if state.get("base") is not None:  # a HeadEmbedder: the backbone's model is in base
        clone.base = _unloaded(state["base"])
        return clone
    for attr in ("model_", "compiled_"):  # Keras model, OpenVINO compiled model (unpicklable)
        if state.get(attr) is not None:
            setattr(clone, attr, None)
    return clone


def _user_error(exc: BaseException) -> SnaplookError | None:
    """The SnaplookError a worker raised (weights missing, ...), if that is what failed."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None:
        if isinstance(cause, SnaplookError):
            return SnaplookError(str(cause))
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
