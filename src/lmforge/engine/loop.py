"""The one training loop. It knows batches, losses and steps; objectives know the rest."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.tensor import DTensor

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine import sharded_checkpoint as sharded_ckpt
from lmforge.engine.adversarial import own_gradient
from lmforge.engine.checkpoint import load_weights
from lmforge.engine.dropout import use_fast_dropout
from lmforge.engine.hardware import autocast, keep_freed_memory, matmul_roof, pick_device, pick_precision
from lmforge.engine.logging import MetricsLog, Throughput, console, plot_losses, progress_bar
from lmforge.engine.schedule import lr_at, warmup_steps
from lmforge.engine.sharding import (checkpoint_activations, full_state_dict, gathered, gradient_sync,
                                     ignored_settings, parameterless_copy, renamed_groups, shard, unsharded)
from lmforge.engine.signals import StopSignals
from lmforge.errors import LmforgeError, RunInterrupted
from lmforge.recipe import DistConfig, TrainConfig


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0          # non-padding input tokens read, all processes
    flops: float = 0.0       # training FLOPs of the shapes actually run, all processes
    seconds: float = 0.0     # wall time up to this state, summed over every process that trained the run
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    bad_steps: int = 0
    history: list = field(default_factory=list)


class LossModule(torch.nn.Module):
    """Model + objective as one module, so DDP and torch.compile wrap the whole loss computation. An objective with
    weights of its own (`objective.trainable`, a module: e.g. a distillation projection) has them registered here,
    so DDP averages their gradients too."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective
        self.trainable = objective_weights(objective)

    def forward(self, batch: dict):
        return self.objective.loss(self.model, batch)


def objective_weights(objective) -> Optional[torch.nn.Module]:
    """The objective's own trainable weights (trained and checkpointed with the model, never saved in it), if any."""
    module = getattr(objective, "trainable", None)
    return module if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters()) else None


def transformer_blocks(model) -> Optional[torch.nn.ModuleList]:
    """The repeated layers of a transformers model (GPT-2, Llama, BERT-likes), if it has them."""
    for path in ("transformer.h", "model.layers", "bert.encoder.layer", "roberta.encoder.layer",
                 "electra.encoder.layer"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    return None


def compile_model(module, model):
    """Compile the repeated block once and reuse it for every layer (compile time of one layer, not
    of the whole model); fall back to compiling the whole loss module."""
    blocks = transformer_blocks(model)
    if blocks is None:
        return torch.compile(module)
    for block in blocks:
        block.compile()
    return module


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay only 2-D weights (matmuls, embeddings); never biases or norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg: TrainConfig, device: str, groups: Optional[list[dict]] = None,
                   extra: Optional[list] = None) -> torch.optim.Optimizer:
    """AdamW over `groups` (default: decay on 2-D weights) and the objective's own weights `extra` (no decay); a
    group's `lr_scale` multiplies the schedule's lr."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    groups = groups or param_groups(model, cfg.weight_decay)
    if extra:
        groups = groups + [{"params": extra, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def ratios(tallies: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {name: value / count for name, (value, count) in tallies.items() if count}


def move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _average_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return dist.all_reduce_sum(t).div_(dist.world_size())


class Engine:
    """Train `model` with `objective` on batches from `loader`; evaluate with `evaluate(model) -> dict`."""

    def __init__(self, model, tokenizer, objective, loader, cfg: TrainConfig, run_dir: Path, *,
                 evaluate: Optional[Callable[[torch.nn.Module], dict]] = None, flops_per_token: float = 0.0,
                 batch_flops: Optional[Callable[[dict], float]] = None,
                 tensorboard: bool = True, plots: bool = True, show_progress: bool = True,
                 param_groups: Optional[list[dict]] = None, started: Optional[float] = None,
                 on_eval: Optional[Callable[[int, dict], Optional[str]]] = None,
                 dist_cfg: Optional[DistConfig] = None, adversarial=None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist_cfg = dist_cfg or DistConfig()
        # Wall time counts from `started` (the stage's start, perf_counter) plus the time of the processes before
        # a resume, as recorded in the checkpoint resumed from.
        self.started, self.earlier_seconds = started if started is not None else time.perf_counter(), 0.0
        # `on_eval(step, metrics)` sees every evaluation; a reason it returns stops the run there (a tuner's pruner).
        self.on_eval = on_eval
        # `adversarial` (an `engine.adversarial.FGM` or `PGD`): a second pass on perturbed embeddings after each backward.
        self.adversarial, self.step_adversarial_s = adversarial, 0.0
        self.tokenizer, self.objective, self.loader, self.evaluate = tokenizer, objective, loader, evaluate
        self.device_type = pick_device(cfg.device)
        self.device = dist.setup(self.device_type, self.dist_cfg.timeout_s)
        self.precision = pick_precision(cfg.precision, self.device_type)
        self.model = model.to(self.device)
        # FSDP on CPU: freed memory goes back to the system, since the many sizes of the gathered weights and
        # gradients would otherwise grow the heap past what sharding saves
        if self.device_type == "cpu" and not (self.dist_cfg.strategy == "fsdp" and dist.world_size() > 1):
            keep_freed_memory()  # no page faults for the activations every step
        if self.device_type == "cpu" and not cfg.compile:
            use_fast_dropout(self.model)  # torch's CPU dropout mask is the slow part of dropout
        # MFU counts the work of the shapes actually run: `batch_flops(batch)` where padding or skipped positions
        # make it differ from `flops_per_token` x the tokens read.
        self.flops_per_token, self.batch_flops = flops_per_token, batch_flops
        self.plots, self.show_progress = plots, show_progress
        self.main = dist.is_main()
        self.log = MetricsLog(self.run_dir, tensorboard=tensorboard, enabled=self.main)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.state = TrainState()
        # FSDP when asked and there is more than one process to shard across
        self.sharded = self.dist_cfg.strategy == "fsdp" and dist.world_size() > 1
        self.extra = objective_weights(objective)
        if self.extra is not None:
            if self.dist_cfg.strategy == "fsdp":
                raise LmforgeError("dist.strategy fsdp: this objective trains weights of its own (a projection), "
                                   "which sharded checkpoints do not hold; use dist.strategy ddp")
            self.extra.to(self.device)
        self.module = self._wrap(LossModule(self.model, objective))
        if self.sharded:  # fully_shard replaced every parameter: groups made before name the new ones
            param_groups = renamed_groups(param_groups, self.parameter_names, self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device_type, param_groups,
                                        list(self.extra.parameters()) if self.extra is not None else None)
        self.warmup = warmup_steps(cfg.warmup_steps, cfg.max_steps)
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Activation checkpointing, compilation, then DDP or FSDP, as the recipe asks."""
        if self.main:
            for note in ignored_settings(self.dist_cfg, self.device_type, dist.world_size()):
                console.print(f"[yellow]{note}")
        self.parameter_names = {id(p): n for n, p in self.model.named_parameters()}
        # where the weights are gathered after training: the model's structure, without its parameters
        self.skeleton = parameterless_copy(self.model) if self.sharded else None
        if self.dist_cfg.activation_checkpointing:
            checkpoint_activations(self.model)
        if self.cfg.compile:
            module = compile_model(module, self.model)
        if self.sharded:
            return shard(module, self.model, self.dist_cfg, self.device_type)
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device_type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    def export_model(self) -> Optional[torch.nn.Module]:
        """The trained model as one plain module (every process must call this). Under FSDP the shards are
        gathered into a fresh CPU copy on process 0 and the others get None; otherwise the model itself."""
        if not self.sharded:
            return self.model
        state = full_state_dict(self.model)
        return unsharded(self.skeleton, state) if self.main else None

    def save_model(self, folder: Path, extra: Optional[dict] = None) -> None:
        """Every process: write the model, consolidated, with the tokenizer as one Hugging Face folder."""
        model = self.export_model()
        if self.main:
            ckpt.save_model(folder, model, self.tokenizer, extra)

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self, folder: Optional[Path] = None) -> bool:
        folder = folder or ckpt.latest_checkpoint(self.checkpoint_dir)
        if folder is None:
            return False
        state = ckpt.load_state(folder)
        if sharded_ckpt.is_sharded(folder):  # written under FSDP by any number of processes
            sharded_ckpt.load_sharded(folder, self.model, self.optimizer)
        elif self.sharded:
            raise LmforgeError(f"{folder}: a one-file checkpoint (dist.strategy ddp); resume it with dist.strategy "
                               "ddp, or start the FSDP run afresh")
        else:
            load_weights(self.model, folder, self.device)
            if self.extra is not None and "objective" in state:
                self.extra.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        self.earlier_seconds = self.state.seconds
        ckpt.set_rng_state(state["rng"])
        self.log.truncate_after(self.state.step)
        if self.main:
            console.print(f"resumed from {folder} at step {self.state.step}")
        return True

    def wall_seconds(self) -> float:
        """The run's wall time so far: this process's since `started`, plus every earlier process's."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def save(self) -> Optional[Path]:
        """Every process: write a checkpoint (sharded under dist.strategy fsdp); its folder on process 0."""
        self.state.seconds = self.wall_seconds()
        if self.dist_cfg.strategy == "fsdp":
            state = ckpt.trainer_state(asdict(self.state), self.scaler)
            path = sharded_ckpt.save_sharded(self.checkpoint_dir, self.state.step, self.model, self.optimizer, state)
        elif self.main:
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.state.step, self.model, self.tokenizer,
                                        self.optimizer, asdict(self.state), self.scaler,
                                        self.extra.state_dict() if self.extra is not None else None)
        if not self.main:
            return None
        ckpt.prune_checkpoints(self.checkpoint_dir, self.cfg.keep_last)
        return path

    # ----------------------------------------------------------------- training
    def _set_lr(self) -> float:
        lr = lr_at(self.state.step, lr=self.cfg.lr, min_lr=self.min_lr, warmup=self.warmup,
                   max_steps=self.cfg.max_steps, schedule=self.cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over `grad_accum` micro-batches. Returns (loss, grad norm, loss tokens); the
        input tokens read and the FLOPs run (all processes) are left in `self.step_inputs` and `self.step_flops`."""
        cfg, step = self.cfg, self.state.step
        self.step_adversarial_s = 0.0
        micro = []
        for m in range(cfg.grad_accum):
            ids, positions, domains = self.loader.micro_batch(step, m)
            micro.append(move(self.objective.make_batch(ids, positions, domains), self.device))
        # Normalise by the loss tokens of the whole step on all ranks: the large-batch gradient.
        local = sum(self.objective.count_tokens(b) for b in micro)
        self.step_inputs = sum(self.objective.count_inputs(b) for b in micro) * dist.world_size()
        self.step_flops = (sum(self.batch_flops(b) for b in micro) * dist.world_size() if self.batch_flops
                           else self.flops_per_token * self.step_inputs)
        global_tokens = dist.all_reduce_sum(torch.tensor(float(local), device=self.device)).item()
        scale = dist.world_size() / max(global_tokens, 1.0)  # DDP averages gradients over ranks
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro):
            sync = m == len(micro) - 1 or dist.world_size() == 1
            with gradient_sync(self.module, sync):
                with autocast(self.device_type, self.precision):
                    loss_sum, _, _ = self.module(batch)
                if self.adversarial is None:
                    self._backward(loss_sum, scale)
                else:
                    averaged = sync and dist.world_size() > 1  # DDP averages this micro-batch's gradients
                    with own_gradient(self.adversarial.embedding_weight(self.model),
                                      settle=_average_over_ranks if averaged else None):
                        self._backward(loss_sum, scale)
                        self._adversarial_pass(batch, scale)
            total += loss_sum.detach().float()
        loss = dist.all_reduce_sum(total).item() / max(global_tokens, 1.0)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.extra is not None:
            params += [p for p in self.extra.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = float(total.full_tensor() if isinstance(total, DTensor) else total)  # FSDP: a norm of shards
        # clip_grad_norm_ multiplies every gradient by min(1, clip / (norm + 1e-6)) even when that is 1
        if cfg.grad_clip and norm + 1e-6 > cfg.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, total)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
            return float("nan"), norm, int(global_tokens)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, int(global_tokens)

    def _backward(self, loss_sum: torch.Tensor, scale: float) -> None:
        scaled = loss_sum.float() * scale
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def _adversarial_pass(self, batch: dict, scale: float) -> None:
        """The batch again on embeddings perturbed along their gradient (once for FGM, `steps` times for PGD); the
        adversarial gradient adds to the clean one and the embeddings are restored. Its seconds are counted apart (the cost of adversarial training)."""
        started = time.perf_counter()

        def forward_backward() -> None:
            with autocast(self.device_type, self.precision):
                loss_sum, _, _ = self.module(batch)
            self._backward(loss_sum, scale)

        self.adversarial.attack(self.model, forward_backward)
        self.step_adversarial_s += time.perf_counter() - started

    def run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        self.model.eval()
        whole = gathered(self.module, self.dist_cfg.reshard_after_forward) if self.sharded else contextlib.nullcontext()
        with torch.no_grad(), autocast(self.device_type, self.precision), whole:
            metrics = self.evaluate(self.model)
        self.model.train()
        if not metrics:
            return {}
        record = {"step": self.state.step, "split": "validation", **metrics}
        self.log.write(record)
        self.state.history.append(record)
        return metrics

    def _after_eval(self, metrics: dict) -> bool:
        """Track the best checkpoint; return True when early stopping says stop."""
        if self.cfg.metric not in metrics:
            return False
        value = metrics[self.cfg.metric]
        better = (self.state.best_metric is None or
                  (value < self.state.best_metric if self.cfg.metric_mode == "min" else value > self.state.best_metric))
        if better:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evals_without_improvement = 0
            self.save_model(self.run_dir / "best", {"best.json": {"step": self.state.step, self.cfg.metric: value}})
        else:
            self.state.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.state.evals_without_improvement >= patience

    def _eval_hook(self, metrics: dict) -> Optional[str]:
        """The reason `on_eval` gives to stop (None: go on); every process stops at the same step."""
        reason = self.on_eval(self.state.step, metrics) if self.on_eval and metrics else None
        if dist.world_size() > 1:
            flag = dist.all_reduce_max(torch.tensor([1 if reason else 0], device=self.device))
            if int(flag.item()) and not reason:
                reason = "stopped by the evaluation hook of the main process"
        return reason

    def _stop_signal(self, signals: StopSignals) -> int:
        """The stop signal any process received (0: none); every process stops at the same step."""
        if dist.world_size() == 1:
            return signals.received or 0
        flag = torch.tensor([signals.received or 0], device=self.device)
        return int(dist.all_reduce_max(flag).item())

    def _training_tallies(self) -> dict:
        """The objective's training tallies since the last log, summed over every rank."""
        take = getattr(self.objective, "take_tallies", None)
        tallies = take(True) if take else {}
        if dist.world_size() == 1:
            return tallies
        names = list(getattr(self.objective, "tally_names", ()))  # the same on every rank
        flat = torch.tensor([x for n in names for x in tallies.get(n, (0.0, 0.0))], dtype=torch.float64)
        flat = dist.all_reduce_sum(flat.to(self.device)).cpu().tolist()
        return {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(names)}

    def fit(self) -> TrainState:
        """Train to `max_steps` (or an early stop). A collective that fails because another process died or
        stalled past `dist.timeout_s` ends the run with one error line, not a hang or a C++ trace."""
        try:
            return self._fit()
        except RuntimeError as err:
            if not dist.lost_peer(err):
                raise
            where = ckpt.latest_checkpoint(self.checkpoint_dir)
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise LmforgeError(
                f"process {dist.rank()} lost the other processes at step {self.state.step + 1}: one died or stalled "
                f"longer than dist.timeout_s={self.dist_cfg.timeout_s:g} s ({first}); last checkpoint: "
                f"{where or 'none yet'}; run the same command with --resume to continue") from None

    def _fit(self) -> TrainState:
        cfg = self.cfg
        self.model.train()
        peak = matmul_roof(self.device_type, self.precision) * (dist.world_size())
        meter = Throughput(peak)
        window_loss, window_n, stop_reason = 0.0, 0, "max_steps"
        window_s, window_adversarial_s = 0.0, 0.0
        signals = StopSignals(announce=self.main)
        with signals, progress_bar(self.main and self.show_progress) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.state.step, status="")
            if cfg.eval_at_start and self.state.step == 0:
                metrics = self.run_eval()  # the model as it comes in: the "before" of continued pretraining
                if metrics:
                    bar.console.print("step 0: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k))
            while self.state.step < cfg.max_steps:
                lr = self._set_lr()
                started = time.perf_counter()
                loss, norm, _ = self.train_step()
                window_s += time.perf_counter() - started
                window_adversarial_s += self.step_adversarial_s
                self.state.step += 1
                self.state.tokens += self.step_inputs
                self.state.flops += self.step_flops
                meter.add(self.step_inputs, self.step_flops)
                if math.isnan(loss):
                    self.state.bad_steps += 1
                    console.print(f"[yellow]step {self.state.step}: loss or gradient not finite; step skipped")
                    if self.state.bad_steps >= cfg.max_bad_steps:
                        last = ckpt.latest_checkpoint(self.checkpoint_dir)
                        raise LmforgeError(
                            f"training stopped: {self.state.bad_steps} steps in a row with a NaN/inf loss at step "
                            f"{self.state.step}; last good checkpoint: {last or 'none (no checkpoint saved yet)'}")
                    continue
                self.state.bad_steps = 0
                window_loss, window_n = window_loss + loss, window_n + 1
                if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                    tps, mfu = meter.read()
                    record = {"step": self.state.step, "loss": window_loss / window_n, "lr": lr, "grad_norm": norm,
                              "tokens": self.state.tokens, "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
                              "elapsed_s": round(self.wall_seconds(), 2)}
                    record.update({k: round(v, 5) for k, v in ratios(self._training_tallies()).items()})
                    if self.adversarial is not None:  # what adversarial training costs: its share of step time
                        record["adversarial_share"] = round(window_adversarial_s / max(window_s, 1e-9), 4)
                    window_s, window_adversarial_s = 0.0, 0.0
                    self.log.write(record)
                    bar.update(task, completed=self.state.step,
                               status=f"loss {record['loss']:.4f}  {tps:,.0f} tok/s  mfu {mfu:.0%}")
                    window_loss, window_n = 0.0, 0
                last = self.state.step == cfg.max_steps
                eval_now = (cfg.eval_every and self.state.step % cfg.eval_every == 0) or last
                stop = False
                if eval_now:
                    metrics = self.run_eval()
                    stop = self._after_eval(metrics)
                    stop_reason = "early_stopping" if stop else stop_reason
                    hooked = self._eval_hook(metrics)
                    if hooked:
                        stop, stop_reason = True, hooked
                    if metrics:
                        bar.console.print(f"step {self.state.step}: " + "  ".join(
                            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k))
                save_now = (cfg.save_every and self.state.step % cfg.save_every == 0) or \
                           (not cfg.save_every and eval_now) or last or stop
                signum = self._stop_signal(signals)
                if save_now or signum:
                    self.save()
                if signum and not last:
                    self.log.close()
                    if self.main and self.plots:
                        plot_losses(self.run_dir)
                    where = ckpt.latest_checkpoint(self.checkpoint_dir)
                    raise RunInterrupted(signum, f"stopped by {signal.Signals(signum).name} at step "
                                                 f"{self.state.step} of {cfg.max_steps}; checkpoint: {where}; "
                                                 "run the same command with --resume to continue")
                if stop:
                    if self.main:
                        console.print(f"stopped at step {self.state.step}: {stop_reason}")
                    break
                if eval_now or save_now:
                    meter.reset()  # evaluation and saving are not training throughput
        self.state.history.append({"stop_reason": stop_reason})
        self.state.seconds = self.wall_seconds()
        if self.main and self.plots:
            plot_losses(self.run_dir)
        self.log.close()
        self._release_process_group()
        return self.state

    def _release_process_group(self) -> None:
        """Drop the DDP wrapper once training is over: its reducer holds the process group, and a gloo group
        destroyed only when the reducer is freed, after the other ranks have exited, can hang in its destructor."""
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel):
            self.module = self.module.module
