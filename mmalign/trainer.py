"""The shared trainer: everything that is not an algorithm.

Device placement, mixed precision and multi-process (DDP; FSDP/DeepSpeed configs through
`accelerate launch`) come from accelerate. The trainer owns gradient checkpointing,
accumulation, clipping, AdamW + warmup schedule, EMA, atomic checkpoints with exact
resume, JSONL metrics, a progress bar, and periodic evaluation (sample grid + reward).
A method only computes `loss(batch, generator)`; the other hooks it may have, and what the
trainer needs of generators and rewards, are the protocols of `mmalign.protocols`
(docs/interfaces.md), on which the trainer dispatches.

Run directory layout:
    config.yaml            the resolved config
    metrics.jsonl          one JSON object per logged step / evaluation
    samples/step_*.png     evaluation grids (fixed prompts and seeds)
    checkpoints/step_*/    trainable weights, optimizer, scheduler, EMA, RNG, step (and method.pt:
                           the state of models a method owns, e.g. RG-LCD's target network)
    final/                 the trained weights (LoRA in diffusers format, or the UNet)
    summary.json           timings and final evaluation
    .lock                  pid and host of the run using the directory (mmalign.rundir)

Nothing is written into the run directory before the config, the resume point and the data
have been validated; a directory holding another run is refused unless resumed or overwritten.
SIGINT / SIGTERM finish the current step, save a checkpoint and raise RunInterrupted (a second
signal abandons the step); see docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmalign import checkpoint as ckpt
from mmalign import registry, rundir, tracking
from mmalign.config import RunConfig, dump_config, to_dict
from mmalign.data import preference as P
from mmalign.data.generated import generate_pairs, load_prompts
from mmalign.data.sampling import GlobalBatchSampler, Seeded
from mmalign.evaluation import evaluate_config
from mmalign.media import image_grid, save_wav, video_grid
from mmalign.methods.online import dump_rollout, load_buffer, save_buffer
from mmalign.protocols import (
    AfterStepMethod,
    Generator,
    Method,
    MovesToDevice,
    OnlineMethod,
    OwnDataMethod,
    RewardOptionalMethod,
    RoleError,
    SetupMethod,
    StatefulMethod,
    require,
)


class TrainingError(RuntimeError):
    pass


class RunInterrupted(Exception):
    """Training stopped by SIGINT / SIGTERM; `checkpoint` is the newest checkpoint to resume from (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, abandoned: bool = False):
        self.signum, self.step, self.checkpoint, self.abandoned = signum, step, checkpoint, abandoned
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def build(kind: str, component) -> Any:
    return registry.lookup(kind, component.name).build(component.args)


class Trainer:
    def __init__(
        self, cfg: RunConfig, run_dir: str | Path | None = None, resume: str | None = None, overwrite: bool = False
    ):
        # accelerate and diffusers are heavy imports: deferred until a Trainer is built / trains
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        t = cfg.train
        self.run_dir = Path(run_dir or cfg.run.output_dir or f"runs/{cfg.run.name}")
        self.acc = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum,
            **tracking.accelerator_kwargs(t.report_to, self.run_dir),
        )  # train.report_to
        self.is_main = self.acc.is_main_process
        set_seed(cfg.run.seed)  # identical LoRA init on every process
        self.generator = build("generator", cfg.generator).to(self.acc.device)
        self.reward = build("reward", cfg.reward) if cfg.reward is not None else None
        if isinstance(self.reward, MovesToDevice):
            self.reward.to(self.acc.device)
        self.method = build("method", cfg.method)
        self._check_roles()
        # Methods that own models besides the generator (RG-LCD: a frozen teacher, an EMA target
        # network, a latent reward model) are SetupMethod / AfterStepMethod / StatefulMethod:
        # setup(generator, reward) once here; after_step(generator) -> metrics after each
        # optimizer step; state_dict() / load_state_dict() saved with every checkpoint as method.pt.
        if isinstance(self.method, SetupMethod):
            self.method.setup(self.generator, self.reward)
        if t.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
        self.resume = resume
        self.overwrite = overwrite
        self.ckpt_root = self.run_dir / "checkpoints"
        self.lock = rundir.RunLock(self.run_dir, log=self._print)
        self._claimed = False
        self._pending_logs: list[dict] = []  # rows logged before the run directory is claimed
        self._resume_step: int | None = None
        self._stop: int | None = None  # the signal that asked training to stop
        self._skipped_total = 0  # non-finite steps skipped (train.skip_nonfinite)
        self._rolled_back_to: set[Path] = set()
        self.step = 0
        self.buffer = None  # the online round in progress
        self._resumed_buffer = None
        self._round_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def _check_roles(self) -> None:
        """One clear line when the method or generator does not play the role the run needs."""
        g, m = self.cfg.generator.name, self.cfg.method.name
        try:
            require(self.generator, Generator, "the trainer", f"generator {g!r} ({type(self.generator).__name__})")
            require(self.method, Method, "the trainer", f"method {m!r} ({type(self.method).__name__})")
            require(
                self.generator,
                self.method.generator_role,
                f"method {m!r}",
                f"generator {g!r} ({type(self.generator).__name__})",
            )
        except RoleError as e:
            raise TrainingError(str(e)) from None

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        if not self._claimed:  # written by _claim, once the run directory may be written
            self._pending_logs.append(record)
            return
        path = self.run_dir / "metrics.jsonl"
        with rundir.writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(self.acc, record, self.step)  # the same numbers to train.report_to's trackers

    def _claim(self) -> None:
        """First write into the run directory, once config, resume point and data are validated.

        Moves an old run aside (--overwrite), takes the lock, drops metrics rows after the resumed
        step, writes config.yaml (what this run uses) and the rows logged so far.
        """
        if self._claimed:
            return
        if self.is_main:
            if self.overwrite and not self.resume:
                old = rundir.move_aside(self.run_dir)
                if old is not None:
                    self._print(f"--overwrite: the previous run in {self.run_dir} was moved to {old}")
            with rundir.writing(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
            metrics = self.run_dir / "metrics.jsonl"
            if self._resume_step is not None:
                dropped = rundir.truncate_metrics(metrics, self._resume_step)
                if dropped:
                    self._print(f"metrics.jsonl: dropped {dropped} rows logged after step {self._resume_step}")
            rundir.write_atomic(self.run_dir / "config.yaml", dump_config(self.cfg))
            tracking.start(self.acc, to_dict(self.cfg), self.cfg.run.name, self.run_dir)
            seen = metrics.read_text().splitlines() if self._resume_step is not None and metrics.is_file() else []
            self._claimed = True
            for record in self._pending_logs:
                if json.dumps(record) not in seen:  # a resumed run's data rows are logged once
                    self._log(record)
            self._pending_logs = []
        self._claimed = True
        self.acc.wait_for_everyone()

    def _check_resume_config(self, resume_from: Path) -> None:
        """Refuse overrides that would change a resumed run's optimisation; report the ones applied."""
        self._resume_step = int(json.loads((resume_from / "state.json").read_text())["step"])
        old = self.run_dir / "config.yaml"
        if not old.is_file():
            old = resume_from.parent.parent / "config.yaml"
        if not old.is_file():
            return
        try:
            ok, bad = rundir.resume_changes(old.read_text(), dump_config(self.cfg))
        except (ValueError, OSError) as e:
            raise TrainingError(f"--resume: cannot read {old}: {e}") from None
        if bad:
            raise TrainingError(
                f"--resume: {', '.join(bad)} differ from {old}, which would change the resumed "
                f"run's training; only {', '.join(rundir.RESUMABLE)} may change on resume (start "
                f"a new run with --overwrite or another --output-dir to change the others)"
            )
        if ok:
            self._print(f"--resume: applying changed {', '.join(ok)} (recorded in config.yaml)")

    def _build_data(self):
        d = self.cfg.data
        if isinstance(self.method, OwnDataMethod):  # a method that reads its own data (e.g. vlm_dpo)
            self._claim()  # the method reads (and may cache) its own data under the run directory
            ds = self.method.build_dataset(d, self.generator, self.run_dir, log=self._print, accelerator=self.acc)
            self._log({"data/pairs": len(ds)})
            return ds
        res = d.resolution or self.generator.resolution
        if d.kind == "generated":
            if self.reward is None:
                raise TrainingError("data.kind=generated ranks samples with a reward: set `reward:`")
            self._claim()
            with self.acc.autocast(), rundir.writing(self.run_dir / "generated_pairs.safetensors"):
                ds = generate_pairs(
                    self.generator,
                    self.reward,
                    d,
                    seed=self.cfg.run.seed,
                    log=self._print,
                    accelerator=self.acc,
                    cache=self.run_dir / "generated_pairs.safetensors",
                )
            self._log({"data/pairs": len(ds)})
        elif d.kind in ("manifest", "pickapic"):
            ps = P.read_manifest(d.path) if d.kind == "manifest" else P.read_pickapic(d.path)
            if d.max_samples:
                ps.pairs = ps.pairs[: d.max_samples]
            ps = P.validate_pairs(ps, d.skip_bad)
            P.check_batch_fits(len(ps.pairs), self.cfg.train.batch_size * self.acc.num_processes, ps.source)
            self._print(
                f"data: {len(ps.pairs)} pairs from {ps.source} "
                f"({ps.ties_dropped} ties dropped, {ps.bad_skipped} bad pairs skipped)"
            )
            self._log(
                {"data/pairs": len(ps.pairs), "data/ties_dropped": ps.ties_dropped, "data/bad_skipped": ps.bad_skipped}
            )
            ds = P.PreferenceDataset(ps, res, d.random_flip, seed=self.cfg.run.seed)
            self._claim()
            if d.cache_latents:
                where = d.cache_dir or self.run_dir / "latent_cache"
                with rundir.writing(Path(where)):
                    path = ds.cache_latents(self.generator, where, self.is_main)
                self.acc.wait_for_everyone()
                ds.use_latents(path)
        else:
            raise TrainingError(f"data.kind={d.kind!r}: method {self.cfg.method.name!r} needs preference data")
        return ds

    def _batches(self, ds, start_micro: int) -> Iterator[dict]:
        sampler = GlobalBatchSampler(
            len(ds),
            self.cfg.train.batch_size,
            self.acc.num_processes,
            self.acc.process_index,
            self.cfg.run.seed,
            start_micro,
        )
        loader = DataLoader(
            Seeded(ds),
            batch_sampler=sampler,
            collate_fn=getattr(ds, "collate", P.collate),
            num_workers=self.cfg.data.num_workers,
        )
        return iter(loader)

    def _check_online(self) -> None:
        """An online method's data, reward and rollout size, checked before anything is written."""
        if self.cfg.data.kind != "prompts":
            raise TrainingError(f"method {self.cfg.method.name!r} is online: set data.kind=prompts and data.prompts")
        needs_reward = not isinstance(self.method, RewardOptionalMethod) or self.method.needs_reward
        if self.reward is None and needs_reward:
            raise TrainingError(f"method {self.cfg.method.name!r} scores its samples: set `reward:`")
        n, world = self.method.rollout.prompts_per_round, self.acc.num_processes
        if n % world:
            raise TrainingError(f"rollout.prompts_per_round={n} must divide over {world} processes")
        load_prompts(self.cfg.data.prompts)  # a missing or unreadable prompt file fails here

    def _online_batches(self, start_step: int) -> Iterator[dict]:
        """Rounds of on-policy sampling, each followed by `steps_per_round` optimizer steps."""
        t, rs, seed = self.cfg.train, self.method.rollout, self.cfg.run.seed
        world, rank = self.acc.num_processes, self.acc.process_index
        pool = load_prompts(self.cfg.data.prompts)
        micro_per_round = rs.steps_per_round * t.grad_accum
        rnd, offset = divmod(start_step, rs.steps_per_round)
        while True:
            if offset and self._resumed_buffer is not None:
                buf = self._resumed_buffer
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + rnd)
                picks = torch.randint(len(pool), (rs.prompts_per_round,), generator=g).tolist()
                mine = list(range(rank, rs.prompts_per_round, world))
                prompts = [pool[picks[i]] for i in mine]
                seeds = [seed * 10_000_019 + rnd * rs.prompts_per_round + i for i in mine]
                self.generator.set_forward_module(self.unwrapped)  # sampling: no DDP hooks
                with self.acc.autocast():
                    buf = self.method.collect(self.generator, self.reward, prompts, seeds)
                self.generator.set_forward_module(self.model)
                if t.save_rollouts_every and rnd % t.save_rollouts_every == 0:
                    name = f"round_{rnd:06d}" + (f"_rank{rank}" if world > 1 else "")
                    dump_rollout(buf, self.run_dir / "rollouts" / name)
                stats = self.method.round_metrics(buf)
                if world > 1:
                    vec = self.acc.reduce(torch.tensor(list(stats.values()), device=self.acc.device), "mean")
                    stats = dict(zip(stats, vec.tolist()))
                self._round_metrics = {f"rollout/{k}": v for k, v in stats.items()}
            self._resumed_buffer = None
            self.buffer = buf
            n = self.method.num_items(buf)
            if n == 0:  # e.g. every group had zero advantage: nothing to learn from this round
                raise TrainingError(f"round {rnd}: no trainable items in the buffer (all ties / zero advantages?)")
            g = torch.Generator().manual_seed(seed * 7_368_787 + rnd)
            need = micro_per_round * t.batch_size
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))]).tolist()
            for m in range(offset * t.grad_accum, micro_per_round):
                idx = order[m * t.batch_size : (m + 1) * t.batch_size]
                seeds = [seed * 1_000_000_007 + (rnd * micro_per_round + m) * t.batch_size + i for i in range(len(idx))]
                yield self.method.batch(buf, idx, seeds)
            rnd, offset = rnd + 1, 0

    def _print(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        final = ckpt.step_dir(self.ckpt_root, self.step)
        tmp = ckpt.tmp_dir_for(final)
        if self.is_main:
            ckpt.begin(final)
        self.acc.wait_for_everyone()
        with rundir.writing(tmp):  # disk errors as one line; older checkpoints stay intact
            ckpt.save_rng(tmp, self.acc.process_index)
            if self.buffer is not None:  # online methods: the round in progress, for exact resume
                save_buffer(self.buffer, tmp / f"buffer_{self.acc.process_index}")
        self.acc.wait_for_everyone()
        if self.is_main:
            with rundir.writing(tmp):  # disk errors as one line; older checkpoints stay intact
                sd = {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}
                save_file(sd, str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                if self.ema is not None:
                    torch.save(self.ema.state_dict(), tmp / "ema.pt")
                if isinstance(self.method, StatefulMethod):
                    torch.save(self.method.state_dict(), tmp / "method.pt")
                ckpt.commit(tmp, final, {"step": self.step, "num_processes": self.acc.num_processes})
            ckpt.prune(self.ckpt_root, self.cfg.train.keep_last)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        sd = load_file(str(path / "trainable.safetensors"))
        named = dict(self.unwrapped.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in sd]
        unexpected = [n for n in sd if n not in named]
        if missing or unexpected:
            raise TrainingError(
                f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        with torch.no_grad():
            for n, v in sd.items():
                named[n].copy_(v)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
        if isinstance(self.method, StatefulMethod):
            if not (path / "method.pt").is_file():
                raise TrainingError(f"{path}: no method.pt (the state of method {self.cfg.method.name!r})")
            self.method.load_state_dict(torch.load(path / "method.pt", map_location="cpu", weights_only=True))
        ckpt.load_rng(path, self.acc.process_index)
        buf = path / f"buffer_{self.acc.process_index}"
        if buf.is_dir():
            self._resumed_buffer = load_buffer(buf, self.generator)
        self.step = int(state["step"])
        self._print(f"resumed from {path} at step {self.step}")

    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume == "latest":
            p, skipped = ckpt.latest_intact(self.ckpt_root)
            for bad, why in skipped:
                self._print(f"--resume latest: skipping {bad}: {why}")
            if p is None:
                damaged = f" ({len(skipped)} damaged, skipped)" if skipped else ""
                raise TrainingError(f"--resume latest: no intact checkpoint in {self.ckpt_root}{damaged}")
            return p
        p = Path(self.resume)
        if not (p / "state.json").is_file():
            raise TrainingError(f"--resume {p}: not a complete checkpoint directory (no state.json)")
        why = ckpt.verify(p)
        if why is not None:
            raise TrainingError(f"--resume {p}: damaged checkpoint: {why}")
        return p

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones inside the block (a no-op without EMA)."""
        ema = getattr(self, "ema", None)
        if ema is None:
            yield
            return
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict[str, Any]:
        """Sample the fixed eval prompts (deterministic DDIM, fixed seeds), score, save a grid."""
        e = self.cfg.eval
        out: dict[str, Any] = {}
        if self.is_main and e.enabled:
            self.generator.set_forward_module(self.unwrapped)  # no collective ops on one rank
            with self.acc.autocast(), self.ema_weights():  # evaluate what save_final writes
                out, images = evaluate_config(self.generator, self.reward, e)
            self.generator.set_forward_module(self.model)
            if images.ndim == 3:  # audio clips B,C,T: samples/<tag>/<i>.wav, no image grid
                d = self.run_dir / "samples" / tag
                with rundir.writing(d):
                    d.mkdir(parents=True, exist_ok=True)
                    for i, clip in enumerate(images[:64]):
                        save_wav(d / f"{i:03d}.wav", clip, self.generator.sample_rate)
                self._log({"step": self.step, "tag": tag, "eval": out})
                self.acc.wait_for_everyone()
                return out
            path = self.run_dir / "samples" / f"{tag}.png"
            with rundir.writing(path):
                path.parent.mkdir(exist_ok=True)
                if images.ndim == 5:  # videos: one row of evenly spaced frames per video
                    grid = video_grid(images[:16])
                else:
                    grid = image_grid(images[:64], nrow=min(8 * e.images_per_prompt, 16))
                grid.save(path)
            tracking.log_image(self.acc, "eval/samples", grid, self.step)
            self._log({"step": self.step, "tag": tag, "eval": out})
        self.acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train; the run directory's lock is released however this ends."""
        try:
            return self._fit()
        finally:
            self.lock.release()
            self.acc.end_training()  # closes train.report_to's trackers, however the run ended

    def _fit(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

        t = self.cfg.train
        if t.skip_nonfinite and self.acc.num_processes > 1:
            raise TrainingError("train.skip_nonfinite needs a single process (ranks could disagree on a skipped step)")
        # validation first: nothing is written into the run directory before _claim()
        if self.is_main:  # the other ranks could see the directory after the main one has claimed it
            try:
                rundir.check_free(self.run_dir, bool(self.resume), self.overwrite)
            except rundir.RunDirError as e:
                raise TrainingError(str(e)) from None
        resume_from = self._resume_path()
        if resume_from is not None:
            self._check_resume_config(resume_from)
        if t.flush_denormal:
            torch.set_flush_denormal(True)  # a process-wide CPU setting (see TrainConfig)
        online = isinstance(self.method, OnlineMethod)
        if online:
            self._check_online()
        ds = None if online else self._build_data()
        self._claim()

        self.unwrapped = self.generator.trainable()
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the generator has no trainable parameters")
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.lr_scheduler = get_scheduler(
            t.lr_scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps
        )
        self.model, self.optimizer = self.acc.prepare(self.unwrapped, opt)
        self.generator.set_forward_module(self.model)
        self.ema = None
        if t.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=t.ema_decay)

        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.cfg.eval.enabled and self.cfg.eval.at_start:
            self.evaluate("step_0000000")

        batches = self._online_batches(self.step) if online else self._batches(ds, self.step * t.grad_accum)
        self._print(
            f"training {n_params:,} parameters for {t.steps} steps "
            f"(global batch {t.batch_size * t.grad_accum * self.acc.num_processes}) -> {self.run_dir}"
        )
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        t0, steps_timed = time.perf_counter(), 0
        bad_in_a_row = 0
        with self._stop_on_signals():
            while self.step < t.steps:
                if self._stop_requested():
                    bar.close()
                    self._interrupt()
                sums: dict[str, float] = {}
                bad = None  # the non-finite loss of this step, when it is skipped
                for _ in range(t.grad_accum):
                    batch = next(batches)  # a skipped step still consumes its batches: the data order stays
                    with self.acc.accumulate(self.model), self.acc.autocast():
                        if bad is not None:
                            continue
                        loss, metrics = self.method.loss(batch, self.generator)
                        if not torch.isfinite(loss):
                            bad = self._nonfinite(loss, batch, metrics, params)
                            continue
                        self.acc.backward(loss)
                        if self.acc.sync_gradients:
                            if t.max_grad_norm is not None:
                                gn = self.acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                                metrics["grad_norm"] = float(gn)
                            self.optimizer.step()
                            self.lr_scheduler.step()
                            self.optimizer.zero_grad(set_to_none=True)
                    for k, v in {"loss": float(loss.detach()), **metrics}.items():
                        sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                if bad is not None:  # skipped: no optimizer, scheduler or EMA update
                    self.step += 1
                    bar.update(1)
                    bad_in_a_row += 1
                    self._skipped_total += 1
                    self._log({"step": self.step, "nonfinite_skipped": self._skipped_total, "nonfinite_loss": bad})
                    if bad_in_a_row >= t.skip_nonfinite:
                        batches = self._roll_back(bad_in_a_row, online, ds)
                        bar.n = self.step
                        bar.refresh()
                        bad_in_a_row = 0
                    continue
                bad_in_a_row = 0
                if self.ema is not None:
                    self.ema.step(params)
                if isinstance(self.method, AfterStepMethod):
                    sums.update(self.method.after_step(self.generator) or {})
                self.step += 1
                steps_timed += 1
                if self.acc.num_processes > 1:
                    vec = self.acc.reduce(torch.tensor(list(sums.values()), device=self.acc.device), "mean")
                    sums = dict(zip(sums, vec.tolist()))
                sums["lr"] = self.lr_scheduler.get_last_lr()[0]
                sums.update(self._round_metrics)
                bar.update(1)
                if "rollout/reward_mean" in sums:
                    self._last_reward = sums["rollout/reward_mean"]
                post = {k: f"{sums[k]:.4g}" for k in ("loss", "implicit_acc", "margin") if k in sums}
                if getattr(self, "_last_reward", None) is not None:
                    post["reward"] = f"{self._last_reward:.4g}"
                bar.set_postfix(post)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log({"step": self.step, **sums})
                    self._round_metrics = {}
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save_checkpoint()
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < t.steps:
                    self.evaluate(f"step_{self.step:07d}")
        bar.close()
        elapsed = time.perf_counter() - t0
        self.save_checkpoint()
        self.save_final()
        final_eval = self.evaluate(f"step_{self.step:07d}") if self.cfg.eval.enabled else {}
        final_eval = {f"eval/{k}": v for k, v in final_eval.items() if isinstance(v, (int, float))}
        pairs = steps_timed * t.batch_size * t.grad_accum * self.acc.num_processes
        summary = {
            "steps": self.step,
            "train_seconds": elapsed,
            "seconds_per_step": elapsed / max(steps_timed, 1),
            "samples_per_second": pairs / max(elapsed, 1e-9),
            "trainable_parameters": n_params,
            **final_eval,
        }
        if self.is_main:
            rundir.write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    # ------------------------------------------------------------------ non-finite steps
    def _nonfinite(self, loss: torch.Tensor, batch: dict, metrics: dict, params: list) -> str:
        """A NaN/inf loss: the error naming the step, or (train.skip_nonfinite) drop this step's gradients."""
        value = float(loss.detach())
        if not self.cfg.train.skip_nonfinite:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingError(
                f"non-finite loss ({value}) at step {self.step + 1}, prompts "
                f"{batch['prompts'][:3]}; metrics {metrics}. Nothing was written for this step; "
                f"last checkpoint: {last or 'none'}"
            )
        for p in params:  # the micro-batches already accumulated for this step are dropped too
            p.grad = None
        self._print(f"step {self.step + 1}: non-finite loss ({value}), step skipped (train.skip_nonfinite)")
        return str(value)

    def _roll_back(self, in_a_row: int, online: bool, ds) -> Iterator[dict]:
        """After skip_nonfinite bad steps in a row: reload the newest intact checkpoint; new batches from there."""
        last, _ = ckpt.latest_intact(self.ckpt_root)
        why = (
            f"{in_a_row} non-finite steps in a row up to step {self.step} (train.skip_nonfinite="
            f"{self.cfg.train.skip_nonfinite})"
        )
        if last is None:
            raise TrainingError(f"{why} and no checkpoint to roll back to")
        if last in self._rolled_back_to:
            raise TrainingError(f"{why} again after rolling back to {last}: the bad steps repeat")
        self._rolled_back_to.add(last)
        at = self.step
        self.load_checkpoint(last)
        if self.is_main:
            rundir.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        self._log({"rollback": {"from_step": at, "to": str(last), "nonfinite_skipped": self._skipped_total}})
        self._print(f"{why}: rolled back to {last}")
        t = self.cfg.train
        return self._online_batches(self.step) if online else self._batches(ds, self.step * t.grad_accum)

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM during training: finish the step, then stop (a second signal abandons it)."""

        def handler(signum, frame):
            if self._stop is not None:
                raise RunInterrupted(signum, self.step, ckpt.latest_checkpoint(self.ckpt_root), abandoned=True)
            self._stop = signum
            self._print(
                f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a checkpoint "
                f"and stopping (send it again to abandon the step)"
            )

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _stop_requested(self) -> bool:
        if self.acc.num_processes > 1:  # every rank stops at the same step
            flag = torch.tensor([float(self._stop or 0)], device=self.acc.device)
            stop = float(self.acc.reduce(flag, "sum")) > 0
            if stop and self._stop is None:
                self._stop = signal.SIGTERM
            return stop
        return self._stop is not None

    def _interrupt(self) -> None:
        """Save a checkpoint of the finished steps (unless one exists) and raise RunInterrupted."""
        last = ckpt.latest_checkpoint(self.ckpt_root)
        if self.step > 0 and last != ckpt.step_dir(self.ckpt_root, self.step):
            last = self.save_checkpoint()
        raise RunInterrupted(self._stop, self.step, last)

    def save_final(self) -> Path:
        """The trained weights (EMA if enabled) in the generator's own format, atomically."""
        final = self.run_dir / "final"
        if self.is_main:
            with self.ema_weights(), rundir.writing(final):
                tmp = ckpt.begin(final)
                self.generator.save_trained(tmp)
                ckpt.commit(tmp, final, {"step": self.step})
        self.acc.wait_for_everyone()
        return final
