"""The continual loop: zero-shot row, then per task its phases, evaluation and a checkpoint.

Lightning 2 has no loop customization and a second ``fit`` on one Trainer
stops at once, so every phase gets a fresh Trainer from ``make_trainer`` and
one ``fit``. Structural changes (the method's hooks) happen between phases,
before the Trainer wraps the model and builds the optimizer.

Resume: ``results.json`` says how many tasks are finished; the loop replays
the method's ``on_task_start`` for them to rebuild the expert structure,
loads the last task's adapters, and goes on. Each task's seed derives from
the run seed, so an interrupted and an uninterrupted run give the same matrix.
With ``checkpoint_every_n_steps``, a run also resumes within the task it was
in, from the last in-task checkpoint (``in_task.py``).

The model stays on its device for the whole run: it is placed there once, and
every phase's Trainer leaves it there (``resident.py``).

Every task's files are checked before the zero-shot row (``TaskSequence.check_files``).
Ctrl-C raises ``Interrupted`` naming the task and phase it stopped in (``interrupt.py``).
Bad input skipped under ``on_bad_sample: skip`` is counted per task (training) and per
task and stage (evaluation: each score is over the rows that could be read) in the log
and in ``results.json``'s ``bad_samples``.

Logging: the loggers are the same instances for every phase's Trainer, so a run is one logger
run (one version folder, one metrics.csv; ``finalize`` is called once, when the loop ends). The
resolved config is logged as its hyperparameters once. Every phase logs on one run-wide step,
the optimizer steps the run took before the phase plus the phase's own (the loss as
``taskN_NAME/PHASE/loss``); an evaluation logs its scores at the run-wide step it ran at, with
its stage as ``eval/stage``. ``results.json``'s ``global_step`` keeps the steps of the finished
tasks, so a resumed run's steps go on from there.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator

import lightning as L
import yaml

from mllm_cl.data.errors import BadSampleError
from mllm_cl.distributed import broadcast, is_writer, world
from mllm_cl.eval.continual_metrics import continual_metrics, final_row_metrics
from mllm_cl.eval.evaluate import predict, score, write_predictions
from mllm_cl.eval.sharding import gather_messages
from mllm_cl.system.environment import record_environment
from mllm_cl.system.in_task import InTaskCheckpoints, Resume
from mllm_cl.system.interrupt import Interrupted, fit_phase, interrupted_message
from mllm_cl.system.run_dir import RunDir, adapter_state, new_results, parameter_counts

#: Test hook: raise right after the checkpoint of this task number (1-based) is saved.
FAULT_ENV = "MLLM_CL_FAULT_AFTER_TASK"


class InjectedFault(RuntimeError):
    pass


class ContinualLoop:
    """Runs one sequence into ``run_dir``.

    Args:
        module: the ContinualMLLM (backbone + method).
        datamodule: the TaskSequence.
        make_trainer: ``(steps, accumulation) -> Trainer`` for one phase (fresh each time, explicit callbacks).
        run_dir: the run directory.
        config_text: the resolved config, compared on resume.
        experiment, seed: recorded in results.json.
        callbacks: continual callbacks whose task/phase hooks the loop calls.
        eval_future_tasks: also evaluate task t+1 after task t (fills what FWT needs).
        score_mode: scorer mode (``official`` or ``clean``).
        loggers: Lightning loggers, given to every phase's Trainer: they receive the resolved config
            as hyperparameters, the training losses, each stage's scores as ``eval/TASK`` with
            ``eval/stage``, and the final metrics as ``final/METRIC``, all at the run-wide step.
        device: where the model trains, evaluates and the method's hooks run (it is moved there once,
            if it was loaded elsewhere); ``None``: where it is.
        accumulation: ``trainer.accumulate_grad_batches``, for phases without samples per step.
        checkpoint_every_n_steps: a checkpoint within the task every this many optimizer steps of a
            phase (0: only after each task).

    Under several processes (``ddp``) every process runs this loop in step: each trains on its
    share of the batches, evaluates its share of the test set (the rows are gathered), and takes
    the same decisions; only rank 0 writes the run directory and prints.
    """

    def __init__(self, module, datamodule, make_trainer: Callable[[int, int], L.Trainer], run_dir, *, config_text: str,
                 experiment: str, seed: int, callbacks=(), eval_future_tasks: bool = False,
                 score_mode: str = "official", loggers=(), print_fn=print, device=None,
                 checkpoint_every_n_steps: int = 0, accumulation: int = 1) -> None:
        self.module, self.dm, self.make_trainer = module, datamodule, make_trainer
        self.accumulation = accumulation
        self.run = RunDir(run_dir, writer=is_writer())
        self.device = device
        if checkpoint_every_n_steps < 0:
            raise ValueError(f"checkpoint_every_n_steps must be >= 0 (0: off), got {checkpoint_every_n_steps}")
        refusal = module.method.in_task_refusal
        if checkpoint_every_n_steps and refusal:
            raise ValueError(f"checkpoint_every_n_steps: method {module.method.name} cannot resume within a task: "
                             f"{refusal}; set it to 0 (the run still resumes after each finished task)")
        self.checkpoint_every = checkpoint_every_n_steps
        self.config_text, self.experiment, self.seed = config_text, experiment, seed
        self.callbacks = list(callbacks)
        self.eval_future_tasks, self.score_mode = eval_future_tasks, score_mode
        self.loggers = list(loggers)
        self.global_step = 0  # the run's optimizer steps so far: the step every log entry is made at
        self.print = print_fn if self.run.writer else (lambda *args, **kwargs: None)

    # -------------------------------------------------------------------- run
    def __call__(self) -> dict:
        self._at, self._done = (None, "setup"), 0  # where a Ctrl-C stops the run, and the tasks finished
        try:
            with self._one_logger_run():
                return self._run()
        except KeyboardInterrupt:
            last = Resume.read(self.run) if self.checkpoint_every else None  # the checkpoint a rerun resumes from
            within = (last.phase_name, last.step) if last is not None and last.task == self._done else None
            raise Interrupted(interrupted_message(*self._at, self._done, within)) from None

    def _run(self) -> dict:
        module, dm, method = self.module, self.dm, self.module.method
        T = dm.num_tasks
        spec = module.model.data_spec()
        dm.connect(module.tokenizer, module.image_processor(), spec.pop("num_image_tokens"), **spec)
        dm.check_files()  # every task's files before the zero-shot row (done already, and kept, under mllm-cl fit)
        module.budget.check_tasks(dm.task_names)
        module.sequence = dm  # callbacks that need a task's data at task end (a task locator) read it here
        if hasattr(dm, "_log_hyperparams"):
            dm._log_hyperparams = False  # the loop logs the resolved config once; Lightning would at every fit
        self._to_device()
        resuming, results = broadcast(self._claim())  # rank 0 reads and writes; every rank gets its answer
        if isinstance(resuming, Exception):
            raise resuming  # on every rank, so none waits for the others forever
        if results is None:
            tasks = [{"name": t.name, "scorer": t.scorer, "mode": self.score_mode} for t in dm.tasks]
            results = new_results(method=method.name, experiment=self.experiment, seed=self.seed, tasks=tasks,
                                  one_row=method.one_row)
        done = self._done = results["completed_tasks"]
        self.global_step = results.setdefault("global_step", 0)
        self._log_config()
        self.bad_samples = results.setdefault("bad_samples", {"train": {}, "eval": {}})  # results.json's counts
        self.print(f"mllm-cl: run directory {self.run.path} "
                   f"({'resuming after task ' + str(done) if done else 'new run'})")
        self.print(f"mllm-cl: {record_environment(results, self.device)}")  # results.json's environment block
        rebuild(module, self.run, done)
        self._resume = broadcast(Resume.read(self.run) if self.run.writer else None)
        if self._resume is not None and self._resume.task != done:
            self.print(f"mllm-cl: ignoring {self._resume.folder}: taken in task {self._resume.task + 1}, "
                       f"and task {done + 1} comes next")
            self._resume = None
        if results["zero_shot"] is None:
            self._at = (None, "the zero-shot evaluation")
            self.evaluate_zero_shot(results)
            self.run.save_results(results)
        for t in range(done, T):
            self._task(t, results)
        self.finish(results)
        self.run.save_results(results)
        self._log({f"final/{k}": v for k, v in results["metrics"].items() if v is not None})
        self.print(f"mllm-cl: finished; results in {self.run.results_path}")
        return results

    def _plan(self, t: int, phases: list) -> list:
        """Task ``t``'s phases' steps, accumulation and schedules (``mllm_cl.system.budget``)."""
        dm = self.dm

        def batches(tasks: list[int], fraction: float) -> int:
            dm.set_task(t, fraction=fraction, tasks=tasks)
            return dm.batches_per_epoch()

        try:
            return self.module.budget.plan_task(t, phases, dm.task_names, batches, batch_size=dm.batch_size,
                                                world_size=world()[1], configured_accumulation=self.accumulation)
        finally:
            dm.set_task(t)

    def _task(self, t: int, results: dict) -> None:
        module, dm, method = self.module, self.dm, self.module.method
        T = dm.num_tasks
        self._at = (t + 1, "task start")
        L.seed_everything(dm.task_seed(t), workers=True, verbose=False)
        resume, self._resume = self._resume, None
        progress = None
        if resume is not None:  # the method's state within this task (what earlier phases decided)
            facts, tensors, progress = resume.method_state(self.run, self.device)
            method.load_state(facts, tensors)
        method.on_task_start(module.model, t)
        if resume is not None:
            method.load_task_progress(progress)
        self._hook("on_task_start", t)
        phases, trainable, timings = method.phases(t, T), {}, {}
        if resume is not None:
            trainable, timings = resume.trainable(), resume.timings()
        plans = self._plan(t, phases)
        for k, (phase, plan) in enumerate(zip(phases, plans, strict=False)):
            if resume is not None and k < resume.phase:
                self.global_step += plan.steps  # its steps were taken (each phase runs to its budget)
                continue  # ended before the checkpoint: what it did is in the method's state and the tensors
            if resume is not None and k == resume.phase and k:
                L.seed_everything(dm.task_seed(t) + k, workers=True, verbose=False)  # as after phase k - 1
            steps = plan.steps
            method.on_phase_start(module.model, t, phase)
            self._hook("on_phase_start", t, phase)
            dm.set_task(t, fraction=phase.fraction, tasks=phase.tasks)
            module.log_prefix = f"task{t + 1}_{dm.tasks[t].name}/{phase.name}"
            module.step_offset = self.global_step  # the phase logs at the run's steps so far + its own
            module.phase_schedule = plan.schedule
            module.progress_label = f"task {t + 1}/{T} {dm.tasks[t].name} · {phase.name}"  # system/progress.py
            for name, p in module.model.named_parameters():
                if p.requires_grad:
                    trainable[name] = p
            t0 = time.time()
            self.print(f"mllm-cl: task {t + 1}/{T} {dm.tasks[t].name}: phase {phase.name}, {steps} steps "
                       f"({plan.rule}; {plan.samples_per_step} samples a step, {plan.batches_per_epoch} "
                       f"micro-batches an epoch per process)")
            self._at = (t + 1, f"phase {phase.name}")
            here = resume if resume is not None and k == resume.phase else None
            if here is not None:
                self.run.load_checkpoint(here.folder, module.model)
                dm.skips[dm.tasks[t].name] = here.skips()  # as at the phase's start: its batches are drawn again
                self.print(f"mllm-cl: resuming task {t + 1} ({phase.name}) after step {here.step} of {steps} "
                           f"from {here.folder}")
            extra = []
            if self.checkpoint_every or here is not None:
                extra = [InTaskCheckpoints(self.run, self.checkpoint_every, task=t, phase=k, phase_name=phase.name,
                                           method=method, backbone_info=module.backbone_info, resume=here,
                                           progress={"trainable": trainable, "timings": timings,
                                                     "skips": copy.deepcopy(dm.skips[dm.tasks[t].name])})]
            trainer = self.make_trainer(steps, plan.accumulation, extra_callbacks=extra)
            fit_phase(trainer, module, dm)
            self.global_step += trainer.global_step
            timings[phase.name] = round(time.time() - t0, 3)
            # What the method creates after a fit (cmoe's grown routers) must not depend on how many random
            # draws the fit made: that differs between one process and ddp (Lightning's own samplers).
            L.seed_everything(dm.task_seed(t) + k + 1, workers=True, verbose=False)
            method.on_phase_end(module.model, t, phase)
            self._hook("on_phase_end", t, phase)
        if report := dm.skip_report(t):  # the task's skips, once, when there are any
            self.print(report)
        skips = dm.skips[dm.tasks[t].name]
        self.bad_samples["train"][dm.tasks[t].name] = {"skipped": skips.total, "reasons": dict(skips.counts)}
        method.on_task_end(module.model, t)
        self._hook("on_task_end", t)
        self._at = (t + 1, "evaluation")
        t0 = time.time()
        self.evaluate_stage(results, t)
        results["params"]["trainable_per_task"].append(parameter_counts(sorted(trainable.items())))
        stored = sorted((k, v) for k, v in adapter_state(module.model).items())
        buffers = {name for name, _ in module.model.named_buffers()}
        facts, tensors = method.state()
        results["params"]["stored_per_task"].append(parameter_counts(stored, statistics=buffers,
                                                                     method_state=(method.state_kind, tensors)))
        results["timings"]["tasks"].append({"phases": timings, "eval_s": round(time.time() - t0, 3)})
        self.run.save_checkpoint(t + 1, module.model, {"method": method.name, "backbone": module.backbone_info,
                                                       "method_state": facts}, tensors)
        self.run.drop_in_task()
        results["completed_tasks"] = self._done = t + 1
        results["global_step"] = self.global_step
        self.run.save_results(results)
        if os.environ.get(FAULT_ENV) == str(t + 1):
            raise InjectedFault(f"{FAULT_ENV}={t + 1}: stopping after task {t + 1} as asked")

    def evaluate_zero_shot(self, results: dict) -> None:
        """The zero-shot row (every task, the base model), the general tasks and the method's numbers at stage 0."""
        t0 = time.time()
        results["zero_shot"] = self._evaluate(stage=0, tasks=range(self.dm.num_tasks))
        self._evaluate_general(results, stage=0)
        self._method_metrics(results, stage=0)
        results["timings"]["zero_shot_eval_s"] = round(time.time() - t0, 3)

    def evaluate_stage(self, results: dict, t: int) -> None:
        """The evaluation after task ``t`` (0-based): its row of the matrix (the tasks seen, one more with
        ``eval_future_tasks``; a one-row method only after the last task), the general tasks and the
        method's own numbers, into ``results``. ``mllm-cl evaluate`` runs it on a restored model too."""
        T, method = self.dm.num_tasks, self.module.method
        if method.one_row and t != T - 1:
            return
        upto = min(T - 1, t + 1) if self.eval_future_tasks else t
        row = self._evaluate(stage=t + 1, tasks=range(upto + 1))
        results["matrix"][t] = row + [None] * (T - len(row))
        self._evaluate_general(results, stage=t + 1)
        self._method_metrics(results, stage=t + 1)

    def finish(self, results: dict) -> None:
        """The run's metrics from its matrix, and the general tasks' retention."""
        results["metrics"] = self._metrics(results)
        if results.get("general"):
            results["general"]["retention"] = general_retention(results["general"])

    def _claim(self) -> tuple:
        """(resuming, results so far), or (the refusal, None); rank 0 only, the others get (None, None)."""
        if not self.run.writer:
            return None, None
        try:
            resuming = self.run.claim(self.config_text)
        except Exception as e:  # noqa: BLE001 - handed to every rank, raised there
            return e, None
        return resuming, self.run.load_results() if resuming else None

    def _to_device(self) -> None:
        if self.device is not None:
            self.module.to(self.device)

    def _method_metrics(self, results: dict, *, stage: int) -> None:
        """The method's own numbers from the evaluation just run (a locator's accuracy, ...)."""
        own = self.module.method.stage_metrics(self.dm.task_names)
        if own:
            results.setdefault("method_metrics", {})[f"stage_{stage:02d}"] = own
            self._log({f"method/{k}/{task}": v for k, d in own.items() if isinstance(d, dict)
                       for task, v in d.items() if isinstance(v, (int, float))}, stage=stage)

    def _log(self, metrics: dict, stage: int | None = None) -> None:
        """``metrics`` to every logger at the run-wide step (with ``eval/stage``, given a stage)."""
        if not metrics:
            return
        if stage is not None:
            metrics = {**metrics, "eval/stage": stage}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
            logger.save()

    def _log_config(self) -> None:
        """The resolved config as every logger's hyperparameters (nested as in config.yaml), once a run."""
        config = yaml.safe_load(self.config_text) or {}
        for logger in self.loggers:
            logger.log_hyperparams(config)
            logger.save()

    @contextlib.contextmanager
    def _one_logger_run(self) -> Iterator[None]:
        """The loggers' ``finalize``, which every phase's Trainer calls as its fit ends (a TensorBoard
        logger would close its file and start another), deferred to the end of the run."""
        if not self.loggers:
            yield
            return
        for logger in self.loggers:
            logger.finalize = lambda status: None  # this instance only: its class's method runs at the end
        status = "failed"
        try:
            yield
            status = "success"
        finally:
            for logger in self.loggers:
                if "finalize" in vars(logger):
                    del logger.finalize
                    logger.finalize(status)

    def _hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self.module, *args)

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, *, stage: int, tasks) -> list[float]:
        module, dm = self.module, self.dm
        module.model.eval()
        scores, dropped = [], []
        try:
            for i in tasks:
                rows, log = self._predict(stage, i)
                dropped.append((len(rows), log))
                scores.append(round(score(rows, dm.tasks[i].scorer, self.score_mode), 4))
        finally:
            module.model.train()
        self._log({f"eval/{dm.tasks[i].name}": s for i, s in zip(tasks, scores, strict=False)}, stage=stage)
        names = ", ".join(f"{dm.tasks[i].name}={s:.1f}" + _dropped_note(*d)
                          for i, s, d in zip(tasks, scores, dropped, strict=False))
        self.print(f"mllm-cl: stage {stage:02d}: {names}")
        for i, (_, d) in zip(tasks, dropped, strict=False):
            if d.total:
                self.print(d.summary(f"{dm.tasks[i].name} (stage {stage:02d} evaluation)"))
        return scores

    def _predict(self, stage: int, index: int) -> tuple[list[dict], object]:
        """Task ``index``'s predictions at ``stage`` (``-1 - j``: general task ``j``), written to the run
        directory, and the log of the test rows left out as bad input."""
        module, spec = self.module, self.dm.task_spec(index)
        skipped: list[str] = []
        rows = predict(module.model, module.tokenizer, self.dm.test_dataloader(index),
                       max_new_tokens=spec.max_new_tokens,
                       context=lambda b: module.method.routing_context(b, training=False),
                       desc=f"eval stage {stage} {spec.name}", on_skipped=skipped.extend)
        log = self._note_eval_skips(stage, index, len(rows), gather_messages(skipped))
        if self.run.writer:
            write_predictions(rows, self.run.predictions_path(stage, spec.name))
        if not rows:
            raise BadSampleError(spec.test, f"task {spec.name}: every test row was skipped as bad at stage "
                                            f"{stage}: nothing to score\n{log.summary(spec.name)}")
        return rows, log

    def _evaluate_general(self, results: dict, *, stage: int) -> None:
        """The general tasks (never trained) at this stage: ``results["general"]["scores"]["stage_NN"]``."""
        general = self.dm.general_tasks
        if not general:
            return
        module = self.module
        block = results.setdefault("general", {"tasks": [{"name": g.name, "scorers": self.dm.scorers(g)}
                                                         for g in general], "scores": {}})
        scores = {}
        module.model.eval()
        try:
            for j, spec in enumerate(general):
                rows, _ = self._predict(stage, -1 - j)
                scores[spec.name] = {s: round(score(rows, s, self.score_mode), 4) for s in self.dm.scorers(spec)}
        finally:
            module.model.train()
        block["scores"][f"stage_{stage:02d}"] = scores
        self._log({f"general/{n}/{s}": v for n, d in scores.items() for s, v in d.items()}, stage=stage)
        self.print(f"mllm-cl: stage {stage:02d} general: " + ", ".join(
            f"{n} " + " ".join(f"{s}={v:.1f}" for s, v in d.items()) for n, d in scores.items()))

    def _note_eval_skips(self, stage: int, index: int, scored: int, skipped: list[str]):
        """Count what the evaluation of task ``index`` at ``stage`` left out (for results.json)."""
        log = self.dm.eval_skips(index, skipped)
        self.bad_samples["eval"].setdefault(f"stage_{stage:02d}", {})[self.dm.task_spec(index).name] = {
            "scored": scored, "skipped": log.total, "reasons": dict(log.counts)}
        return log

    def _metrics(self, results: dict) -> dict:
        if self.module.method.one_row:
            return final_row_metrics(results["matrix"][-1])
        return continual_metrics(results["matrix"], results["zero_shot"])


def rebuild(module, run: RunDir, done: int, *, unsaved_routers: tuple[str, ...] = ()) -> None:
    """The model as it was after ``done`` finished tasks: what the method decided from data (layers
    that grew, groups, anchors) first, then a replay of the tasks' hooks to rebuild the expert
    structure, then the saved weights of checkpoint ``done`` (``RunDir.load_checkpoint``)."""
    method = module.method
    if done:
        method.load_state(*run.method_state(done))
    for t in range(done):
        method.on_task_start(module.model, t)
        method.on_task_end(module.model, t)
    if done:
        run.load_checkpoint(done, module.model, unsaved_routers=unsaved_routers)


def general_retention(general: dict) -> dict:
    """Per general task and scorer: the last stage's score / the zero-shot score (``None`` where
    the zero-shot score is 0), the share of what the base could do that the sequence kept."""
    stages = general["scores"]
    first, last = stages.get("stage_00"), stages[max(stages)]
    if first is None:
        return {}
    return {task: {s: (round(last[task][s] / v, 4) if v else None) for s, v in by_scorer.items()}
            for task, by_scorer in first.items()}


def _dropped_note(scored: int, log) -> str:
    """What a stage line says after a score that left test rows out."""
    return f" (over {scored} of {scored + log.total} rows; {log.total} skipped as bad)" if log.total else ""
