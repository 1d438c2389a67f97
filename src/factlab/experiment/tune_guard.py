"""The guards around `factlab tune`: everything checked before the study storage or a trial's
run folder exists, the one place where Optuna's and SQLAlchemy's exceptions become one line,
and what a Ctrl-C inside a trial leaves behind.

- **Preflight** (`preflight_tune`): the tune block (experiment.tune.check_tune), every dimension
  built as the Optuna distribution a trial will ask for (Optuna's own rules: a log scale
  without a step, a step above 0 that divides the range, ...; its warnings count as errors,
  since Optuna would only warn and go on), every categorical choice and enqueued point checked
  like a run (data files, layer groups and ranges against the architecture on the meta device,
  probe lengths: experiment.preflight), the study storage (a SQLite file or nothing, not a text
  file, a folder or another database) and, when the study exists, that its trials' recorded
  distributions and objectives are the ones this experiment would use (Optuna refuses a
  categorical dimension whose choices changed, but only inside a trial, after it has started).
- **Exceptions** (`optuna_errors`): an exception raised by Optuna or SQLAlchemy (a storage that
  cannot be opened, a schema from another Optuna version, ...) becomes one FactlabError line;
  Optuna's own "Trial N failed ..." log record with its traceback is dropped, since the
  exception is raised again and reported by the CLI.
- **Ctrl-C** (`discard_interrupted_trial`): the trial's run folder is removed (the trial is
  retried from the start on resume, as a trial of a killed process is), its run marked failed
  in the store and its parameters queued again; Optuna marks the trial itself failed.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factlab.errors import FactlabError

if TYPE_CHECKING:
    from rich.console import Console

    from factlab.config import Experiment, TuneParam
    from factlab.experiment.store import RunStore

SQLITE_HEADER = b"SQLite format 3\0"


# ---------------------------------------------------------------------------------------
# The search space as Optuna's distributions


class _Recorder:
    """Stands in for an Optuna trial: records the distribution of each `suggest_*` call, built
    from exactly the arguments experiment.tune.suggest passes to a real trial."""

    def __init__(self) -> None:
        self.distributions: dict[str, Any] = {}

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False):
        from optuna.distributions import FloatDistribution

        self.distributions[name] = FloatDistribution(low, high, step=step, log=log)
        return low

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False):
        from optuna.distributions import IntDistribution

        self.distributions[name] = IntDistribution(low, high, step=step, log=log)
        return low

    def suggest_categorical(self, name: str, choices: list):
        from optuna.distributions import CategoricalDistribution

        self.distributions[name] = CategoricalDistribution(choices)
        return choices[0]


def space_distributions(space: dict[str, TuneParam]) -> dict[str, Any]:
    """Dotted key -> the Optuna distribution a trial will suggest it from; a dimension Optuna
    rejects, or only accepts with a warning (it would adjust `high` to the step grid, or store
    an odd choice), is a FactlabError naming tune.space.<key>."""
    from factlab.experiment.tune import suggest

    rec = _Recorder()
    for key, dim in space.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                suggest(rec, key, dim)
        except (ValueError, TypeError, Warning) as e:
            raise FactlabError(f"tune.space.{key}: Optuna does not accept this dimension ({_first_line(e)}); "
                               "fix its low, high, step, log or choices") from None
    return rec.distributions


# ---------------------------------------------------------------------------------------
# The study storage


def check_study_file(path: Path, what: str) -> bool:
    """A SQLite file that is (or will become) an Optuna study storage: absent, empty, or a
    SQLite database with Optuna's tables or none. Returns whether it holds a storage to read."""
    if path.is_dir():
        raise FactlabError(f"{what} {path} is a folder; remove it, or give another --study-name or --storage")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FactlabError(f"{what} {path}: {parent} is a file, not a folder; give another --store or --storage path")
            break
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        raise FactlabError(f"{what} {path} is not an Optuna study storage (not a SQLite database); move it away, "
                           "or give another --study-name or --storage")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise FactlabError(f"{what} {path} cannot be read as a SQLite database ({e}); move it away, "
                           "or give another --study-name or --storage") from None
    if tables and "studies" not in tables:
        raise FactlabError(f"{what} {path} is another SQLite database (tables {', '.join(sorted(tables)[:3])}), not an "
                           "Optuna study storage; give a file of its own (another --study-name or --storage)")
    return bool(tables)


def check_resume(url: str, label: str, name: str, exp: Experiment, distributions: dict[str, Any]) -> None:
    """When study `name` already exists in the storage at `url`: its objectives are this
    experiment's and every recorded distribution of a tune.space key is one Optuna will accept
    again (the same kind and log scale; a categorical dimension the same choices). Reads only."""
    import optuna
    import sqlalchemy

    from optuna.distributions import check_distribution_compatibility

    engine = sqlalchemy.create_engine(url)
    try:
        if not sqlalchemy.inspect(engine).has_table("studies"):
            return  # a new storage: Optuna creates its tables
    except sqlalchemy.exc.SQLAlchemyError as e:  # the server is not there, refuses us, ...
        raise FactlabError(f"{label}: cannot open the study storage ({_first_line(e)}); check the URL, that the database "
                           "exists and that this machine may connect to it") from None
    finally:
        engine.dispose()
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return  # a new study in that storage
    directions = [o.direction for o in exp.tune.objectives]
    if [d.name.lower() for d in study.directions] != directions:
        raise FactlabError(f"study {name} in {label} has other objectives ({len(study.directions)}: "
                           f"{', '.join(d.name.lower() for d in study.directions)}); give another --study-name to start "
                           "a new study, or restore the objectives it was started with")
    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            new = distributions.get(key)
            if new is None:
                continue
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                was = (f"choices {[_decode_choice(c) for c in old.choices]}" if hasattr(old, "choices")
                       else f"{type(old).__name__}(log={getattr(old, 'log', False)})")
                raise FactlabError(f"tune.space.{key} differs from what study {name} in {label} recorded ({was}, trial "
                                   f"{trial.number}); Optuna cannot resume a study whose categorical choices or scale "
                                   "changed: restore them, or give another --study-name to start a new study") from None


def _decode_choice(c: Any) -> Any:
    import json

    if isinstance(c, str):
        try:
            return json.loads(c) if c[:1] in "[{" else c
        except ValueError:
            return c
    return c


# ---------------------------------------------------------------------------------------
# The preflight


def preflight_tune(exp: Experiment, store: RunStore, storage: str | None, study_name: str | None,
                   console: Console | None = None) -> tuple[set[str], set[str]]:
    """Everything about a tune invocation that can be wrong, before anything is written;
    returns the ids of the selection and the report probes (see experiment.tune.check_tune)."""
    from sqlalchemy.engine import make_url

    from factlab.experiment.preflight import ModelShape, preflight
    from factlab.experiment.tune import check_storage_url, check_tune, storage_label, storage_path, trial_experiment

    if storage is not None:
        check_storage_url(storage)
    sel_ids, rep_ids = check_tune(exp)
    t = exp.tune
    seed = exp.seed if t.seed is None else t.seed
    if not 0 <= seed < 2**32:  # numpy's generators, under Optuna's samplers, take no other seed
        raise FactlabError(f"{'seed' if t.seed is None else 'tune.seed'} {seed} cannot seed Optuna's sampler; give "
                           "tune.seed (or seed) between 0 and 2**32 - 1")
    distributions = space_distributions(t.space)
    # The experiment as written, then every categorical choice and every enqueued point, as
    # a run would check them (a sweep's points likewise: experiment.preflight.preflight_sweep).
    shapes = ModelShape(console)
    preflight(trial_experiment(exp, {}), shapes)
    checks = [(f"tune.space.{key}: choice {c!r}", {key: c}) for key, dim in t.space.items() if dim.type == "categorical"
              for c in dim.choices]
    checks += [(f"tune.enqueue.{i}", point) for i, point in enumerate(t.enqueue)]
    for where, values in checks:
        try:
            preflight(trial_experiment(exp, values), shapes)
        except FactlabError as e:
            raise FactlabError(f"{where}: {e}") from None
    name = study_name or exp.name
    root = Path(exp.output_dir) / name
    if root.exists() and not root.is_dir():
        raise FactlabError(f"{root} is a file, but the study's trials go into that folder; move it away or give another "
                           "--study-name")
    if storage is None:
        db = storage_path(store, name)
        url, label, readable = f"sqlite:///{db.resolve()}", str(db), check_study_file(db, "the study storage")
    else:
        url, label = storage, f"--storage {storage_label(storage)}"
        parsed = make_url(storage)
        readable = True
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            readable = check_study_file(Path(parsed.database), "--storage")
    if readable:
        with optuna_errors(label):
            check_resume(url, label, name, exp, distributions)
    return sel_ids, rep_ids


# ---------------------------------------------------------------------------------------
# Exceptions and logs


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def _from_library(e: BaseException) -> bool:
    """Whether Optuna or SQLAlchemy raised `e` (its class is theirs, or the innermost frame of
    its traceback is in their code: their ValueErrors and RuntimeErrors)."""
    module = type(e).__module__ or ""
    if module.startswith(("optuna", "sqlalchemy")):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and any(f"{sep}{lib}{sep}" in frames[-1].filename
                                for lib in ("optuna", "sqlalchemy") for sep in ("/", "\\"))


class _DropFailedTrialRecords(logging.Filter):
    """Optuna logs "Trial N failed with parameters ... because of the following error" with the
    whole traceback before raising the error again; factlab reports that error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "failed with parameters" in str(record.msg))


@contextmanager
def optuna_errors(where: str):
    """Around everything `factlab tune` does with Optuna: an exception raised by Optuna or
    SQLAlchemy becomes one FactlabError line naming `where`; Optuna's failed-trial log records
    (a traceback) are dropped. Other exceptions, FactlabError and Ctrl-C pass unchanged."""
    import optuna.exceptions

    log = logging.getLogger("optuna.study._optimize")
    drop = _DropFailedTrialRecords()
    log.addFilter(drop)
    try:
        yield
    except FactlabError:
        raise
    except optuna.exceptions.TrialPruned:
        raise
    except Exception as e:  # noqa: BLE001 - narrowed by _from_library; anything else is raised unchanged
        if not _from_library(e):
            raise
        raise FactlabError(f"{where}: {_first_line(e)}; check the storage, or give another --study-name to start a new "
                           "study") from None
    finally:
        log.removeFilter(drop)


def discard_interrupted_trial(study, trial, run_dir: Path, store: RunStore) -> None:
    """A trial stopped by Ctrl-C: its run folder removed (no half-written config.yaml or stage
    is left for anyone to read as a result), its run marked failed in the store, and its
    parameters queued again so that the resumed study retries it first. Optuna marks the trial
    itself failed when the interrupt leaves the objective."""
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    try:
        store.mark(run_dir, "failed", "interrupted (Ctrl-C); its folder was removed and the trial queued again")
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    except Exception:  # noqa: BLE001 - a second failure while handling Ctrl-C must not hide the interrupt
        pass
