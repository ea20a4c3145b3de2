"""One place that builds a run: mesh, policy, tokenizer, retriever, sampler, episode runner,
updater, checkpointer and data, from (config, workdir).

  Runtime.build(config, workdir)           a training run (train, compare, warm start)
  Runtime.for_inference(checkpoint_or_workdir, config=...)   generate and evaluate: params only
  Runtime.abstract(config, mesh=...)       no weights, no data: ShapeDtypeStructs with their
                                           NamedShardings, for the AOT planner

Every entry point builds through here, so a sampler always gets the rollout's stop strings the
same way, a checkpoint is always restored the same way, and the optimizer is made once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tspo_jax import checkpointing, data, paths, rollout, sampling
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax.config_checks import validate_config
from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2
from tspo_jax.policy import (POLICY_CONFIG, abstract_policy, build_policy, model_overrides, params_of,
                             save_policy_config, save_run_config)
from tspo_jax.retrieval import Retriever, make_retriever
from tspo_jax.retrieval.build_index import build_index
from tspo_jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


# --- pieces every entry point shares ----------------------------------------------------------------
def make_sampler(graphdef: nnx.GraphDef, model_cfg: qwen2.Qwen2Config, tokenizer: Tokenizer | None, *,
                 eos_ids=None, mesh: Mesh | None = None, episodes: bool = True) -> sampling.Sampler:
    """The sampler for a policy; `episodes` adds the rollout's stop strings (an EpisodeRunner needs
    them), else it decodes plain text. Without a tokenizer (abstract mode) the model's own EOS."""
    if tokenizer is None:
        eos = model_cfg.eos_token_id
        eos_ids = eos_ids or ([eos] if isinstance(eos, int) else list(eos or [0]))
        return sampling.Sampler(graphdef, model_cfg, eos_ids=eos_ids, pad_id=0, mesh=mesh)
    eos_ids = eos_ids or [tokenizer.eos_id]
    if episodes:
        return sampling.Sampler(graphdef, model_cfg, eos_ids=eos_ids, pad_id=tokenizer.pad_id,
                                stop_strings=rollout.STOP_STRINGS, token_bytes=tokenizer.token_bytes, mesh=mesh)
    return sampling.Sampler(graphdef, model_cfg, eos_ids=eos_ids, pad_id=tokenizer.pad_id,
                            tokenizer_vocab=tokenizer.vocab_size, mesh=mesh)


def build_retriever(cfg: ml_collections.ConfigDict, workdir: str | None) -> Retriever:
    """retriever.spec if given (URL or index dir); else an index of retriever.corpus, built once."""
    # An index this config built is read with the config's corpus, not the path in its manifest:
    # the demo's index cache is shared by every clone on the machine.
    spec = ensure_index(cfg, workdir)
    corpus_path = None if cfg.spec else os.path.expanduser(cfg.corpus)
    return make_retriever(spec, timeout_s=cfg.timeout_s, retries=cfg.retries,
                          max_outage_s=cfg.get("max_outage_s", 600.0), corpus_path=corpus_path)


def ensure_index(cfg: ml_collections.ConfigDict, workdir: str | None) -> str:
    if cfg.spec:
        return cfg.spec
    if not cfg.corpus:
        raise ValueError("set retriever.spec (a URL or an index directory) or retriever.corpus (a JSONL to index)")
    if not cfg.index_dir and not workdir:
        raise ValueError("retriever.index_dir is empty and there is no workdir to build the index in: set it")
    if cfg.index_dir:
        index_dir = os.path.expanduser(cfg.index_dir)
    elif paths.is_remote(workdir):
        # ScaNN reads its index from local disk: a gs:// run builds it once per host, in the cache.
        index_dir = os.path.join(paths.local_cache_dir(), "index-" + paths.stable_hash(cfg.corpus, cfg.mode))
    else:
        index_dir = os.path.join(workdir, "index")
    # Process 0 builds while the others wait; a process whose disk does not share index_dir then
    # builds its own copy (the retriever runs on every host).
    if jax.process_index() == 0:
        _build_index_if_missing(cfg, index_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tspo_jax: retrieval index built")
        _build_index_if_missing(cfg, index_dir)
    return index_dir


def _build_index_if_missing(cfg: ml_collections.ConfigDict, index_dir: str) -> None:
    if os.path.exists(os.path.join(index_dir, "manifest.json")):
        return
    log.info("building the %s index of %s into %s", cfg.mode, cfg.corpus, index_dir)
    build_index(cfg.corpus, index_dir, mode=cfg.mode, overwrite=True, progress=False)


def resolve_async_checkpointing(config: ml_collections.ConfigDict) -> bool:
    """checkpoint_async: "auto" saves in the background on accelerators (a 3B state with Adam is
    ~37 GB, minutes of blocked steps) and synchronously on CPU, where a save is small."""
    value = config.get("checkpoint_async", "auto")
    if value == "auto":
        return jax.default_backend() != "cpu"
    return bool(value)


def place_on_mesh(tree, mesh: Mesh):
    """Leaves not already laid out on the mesh (e.g. Adam's step count) become replicated on it,
    so a restored checkpoint has the same shardings as a fresh start."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return x
        return shd.put_global(x, replicated)

    return jax.tree.map(place, tree)


def abstract_opt_state(tx: optax.GradientTransformation, abstract_params, mesh: Mesh):
    """The optimizer state's ShapeDtypeStructs WITH shardings (jax.eval_shape drops them): every
    params-shaped subtree (Adam's mu and nu) takes the params' shardings, the rest is replicated."""
    state = jax.eval_shape(tx.init, abstract_params)
    params_def = jax.tree.structure(abstract_params)
    shardings = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, abstract_params))
    replicated = NamedSharding(mesh, P())

    def is_params_like(x):
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == params_def

    def give(x):
        if is_params_like(x):
            leaves = [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for v, s in zip(jax.tree.leaves(x), shardings)]
            return jax.tree.unflatten(params_def, leaves)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    return jax.tree.map(give, state, is_leaf=is_params_like)


def _abstract_params_on(params, shardings):
    # By leaf order: state_shardings puts a sharding where params hold a Variable, one level up.
    leaves, treedef = jax.tree.flatten(params)
    placed = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, jax.tree.leaves(shardings))]
    return jax.tree.unflatten(treedef, placed)


def _generation_eos(*dirs: str | None) -> list[int]:
    # HF's generate stops at generation_config.json's eos ids (Qwen2.5 instruct: im_end and endoftext).
    for d in dirs:
        path = os.path.join(d, GENERATION_CONFIG) if d else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def eos_ids_for(model_cfg: qwen2.Qwen2Config, tokenizer: Tokenizer, *dirs: str | None) -> tuple[int, ...]:
    """The tokenizer's EOS, the model config's and generation_config.json's, inside the vocabulary."""
    model_eos = [model_cfg.eos_token_id] if isinstance(model_cfg.eos_token_id, int) else list(model_cfg.eos_token_id or [])
    eos = {tokenizer.eos_id, *model_eos, *_generation_eos(*dirs)}
    return tuple(sorted(e for e in eos if 0 <= e < tokenizer.vocab_size))


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The array shapes one training step works on, all from the config (what the planner lowers)."""

    prompts_per_step: int
    group_size: int
    rows: int  # trajectories per step
    mini_batch: int
    micro_batch: int
    prompt_len: int  # the longest prompt the rollout keeps
    context_len: int  # the longest episode: prompt, every turn and every observation
    vocab_size: int


# --- the run ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    config: ml_collections.ConfigDict | None
    workdir: str | None
    mesh: Mesh | None
    model_cfg: qwen2.Qwen2Config
    graphdef: nnx.GraphDef
    params: nnx.State  # arrays, or ShapeDtypeStructs with shardings in abstract mode
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    sampler: sampling.Sampler  # with the rollout's stop strings
    rollout_cfg: rollout.RolloutConfig | None = None
    retriever: Retriever | None = None
    runner: rollout.EpisodeRunner | None = None
    tx: optax.GradientTransformation | None = None
    schedule: optax.Schedule | None = None
    updater: update_lib.PolicyUpdater | None = None
    checkpointer: checkpointing.Checkpointer | None = None
    train_examples: list = dataclasses.field(default_factory=list)
    test_examples: list = dataclasses.field(default_factory=list)
    source: str = "config"  # "config", "hf" or "workdir@STEP": where the params came from
    step: int = 0  # the checkpoint step the params were restored from (0: none)
    abstract_mode: bool = False

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def build(cls, config: ml_collections.ConfigDict, workdir: str, *, abstract: bool = False,
              mesh: Mesh | None = None) -> "Runtime":
        """A training run. Abstract: no weights, no data, no retriever, nothing written; `mesh`
        may then be a mesh of devices this process does not have (an AOT topology)."""
        if not abstract:
            shd.maybe_initialize_distributed()  # first: anything that asks JAX for devices fixes them
        validate_config(config, check_files=not abstract,
                        device_count=mesh.size if mesh is not None else None)
        mesh = mesh if mesh is not None else shd.make_mesh(tuple(config.mesh.shape))
        if abstract:
            graphdef, params, model_cfg, tokenizer = _abstract_policy_from_config(config.model, mesh)
            workdir = str(paths.resolve(workdir)) if workdir else None
        else:
            workdir = str(paths.resolve(workdir))
            paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
            model, tokenizer = build_policy(config.model, mesh)
            graphdef, params, model_cfg = nnx.graphdef(model), params_of(model), model.cfg
            save_policy_config(workdir, model, config.model.tokenizer or config.model.checkpoint)
            save_run_config(workdir, config)  # prompt template, rewards, ...: as verl keeps it
        eos_ids = (tokenizer.eos_id,) if tokenizer is not None else ()
        sampler = make_sampler(graphdef, model_cfg, tokenizer, eos_ids=list(eos_ids), mesh=mesh)
        rollout_cfg = rollout.RolloutConfig(**config.rollout.to_dict())
        retriever = None if abstract else build_retriever(config.retriever, workdir)
        runner = rollout.EpisodeRunner(sampler, tokenizer, retriever, rollout_cfg) if tokenizer is not None else None
        tx, schedule = update_lib.make_optimizer(config.optim, config.total_steps)
        updater = update_lib.PolicyUpdater(
            graphdef, config.loss, tx, mesh,
            temperature=1.0 if config.rollout.greedy else config.rollout.temperature,
            micro_batch=config.micro_batch, tokenizer_vocab=sampler.tokenizer_vocab,
            logprob_micro_batch=config.get("logprob_micro_batch"))
        rt = cls(config=config, workdir=workdir, mesh=mesh, model_cfg=model_cfg, graphdef=graphdef,
                 params=params, tokenizer=tokenizer, eos_ids=eos_ids, sampler=sampler, rollout_cfg=rollout_cfg,
                 retriever=retriever, runner=runner, tx=tx, schedule=schedule, updater=updater,
                 abstract_mode=abstract)
        if not abstract:
            source = config.data.prompt_source
            rt.train_examples = data.load_qa(config.data.train, prompt_source=source)
            rt.test_examples = data.load_qa(config.data.test, prompt_source=source) if config.data.test else []
            rt.checkpointer = checkpointing.Checkpointer(
                str(paths.resolve(workdir) / checkpointing.CHECKPOINTS), keep=config.keep_checkpoints,
                save_every=config.checkpoint_every, async_save=resolve_async_checkpointing(config))
        return rt

    @classmethod
    def abstract(cls, config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> "Runtime":
        return cls.build(config, None, abstract=True, mesh=mesh)

    @classmethod
    def for_inference(cls, checkpoint_or_workdir: str, *, config: ml_collections.ConfigDict | None = None,
                      tokenizer_dir: str | None = None, dtype: str | None = None, step: int | None = None,
                      mesh: Mesh | None = None) -> "Runtime":
        """A policy to sample from: an HF checkpoint directory (config.json + safetensors) or a
        training workdir (policy_config.json + checkpoints/, params only). With `config` (evaluate):
        its mesh, retriever, greedy rollout and test data; without (generate): one device."""
        path = str(paths.resolve(checkpoint_or_workdir))
        if not paths.resolve(path).is_dir():
            raise FileNotFoundError(f"{checkpoint_or_workdir!r} is not a directory: give an HF checkpoint "
                                    "directory or a tspo_jax training workdir")
        if config is not None:
            shd.maybe_initialize_distributed()
            mesh = mesh if mesh is not None else shd.make_mesh(tuple(config.mesh.shape))
            overrides = model_overrides(config.model)
            tokenizer_dir = tokenizer_dir or config.model.tokenizer or None
        else:
            overrides = {}
        if dtype:
            overrides.update(param_dtype=dtype, dtype=dtype)
        restored_step = 0
        if os.path.isfile(os.path.join(path, "config.json")):
            model = params_lib.load_hf_checkpoint(path, mesh=mesh, **overrides)
            graphdef, params, model_cfg = nnx.graphdef(model), params_of(model), model.cfg
            tok_dir, source = tokenizer_dir or path, "hf"
        elif (paths.resolve(path) / POLICY_CONFIG).is_file():
            abstract, saved_tok_dir = abstract_policy(path, **overrides)
            graphdef, model_cfg = nnx.graphdef(abstract), abstract.cfg
            params = params_of(abstract)
            shardings = (shd.state_shardings(params, mesh) if mesh is not None
                         else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params))
            params, restored_step = checkpointing.restore_params(path, _abstract_params_on(params, shardings), step)
            tok_dir, source = tokenizer_dir or saved_tok_dir, f"workdir@{restored_step}"
            if not os.path.isdir(tok_dir):
                raise FileNotFoundError(f"{path}/{POLICY_CONFIG} names the tokenizer directory {tok_dir}, "
                                        "which does not exist: pass the tokenizer directory (generate: --tokenizer=DIR)")
        else:
            raise FileNotFoundError(
                f"{checkpoint_or_workdir!r} is neither an HF checkpoint (no config.json) nor a tspo_jax "
                f"training workdir (no {POLICY_CONFIG}); point it at one of those")
        tokenizer = load_tokenizer(tok_dir)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model embeds "
                             f"only {model_cfg.vocab_size}: pass the checkpoint's own tokenizer (generate: --tokenizer=DIR)")
        eos_ids = eos_ids_for(model_cfg, tokenizer, path, tok_dir)
        sampler = make_sampler(graphdef, model_cfg, tokenizer, eos_ids=list(eos_ids), mesh=mesh)
        rt = cls(config=config, workdir=path, mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, params=params,
                 tokenizer=tokenizer, eos_ids=eos_ids, sampler=sampler, source=source, step=restored_step)
        if config is not None:
            rt.rollout_cfg = dataclasses.replace(rollout.RolloutConfig(**config.rollout.to_dict()), greedy=True)
            rt.retriever = build_retriever(config.retriever, None if source == "hf" else path)
            rt.runner = rollout.EpisodeRunner(sampler, tokenizer, rt.retriever, rt.rollout_cfg)
            rt.test_examples = (data.load_qa(config.data.test, prompt_source=config.data.prompt_source)
                                if config.data.test else [])
        return rt

    # --- state ----------------------------------------------------------------------------------
    def text_sampler(self) -> sampling.Sampler:
        """A sampler without the rollout's stop strings, for plain text generation."""
        return make_sampler(self.graphdef, self.model_cfg, self.tokenizer, eos_ids=list(self.eos_ids),
                            mesh=self.mesh, episodes=False)

    def init_opt_state(self, params):
        return place_on_mesh(self.tx.init(params), self.mesh)

    def abstract_params(self):
        """The params' ShapeDtypeStructs with their shardings (the restore and lowering target)."""
        return checkpointing.abstract_like(self.params)

    def abstract_opt_state(self):
        return abstract_opt_state(self.tx, self.abstract_params(), self.mesh)

    def restore(self, step: int | None = None, *, params_only: bool = False):
        """The training workdir's checkpoint (latest by default): (params, opt_state, meta), or
        just (params, step) with params_only."""
        if params_only:
            return self.checkpointer.restore_params(self.abstract_params(), step)
        state, meta = self.checkpointer.restore(self._abstract_train_state(), step)
        return state["params"], state["opt_state"], meta

    def restore_latest_intact(self, *, fallback: bool = True):
        """(step, params, opt_state, meta) of the newest checkpoint that reads back, or None when
        there is none; an unreadable newer step is named, set aside and skipped (see Checkpointer)."""
        found = self.checkpointer.restore_latest_intact(self._abstract_train_state(), fallback=fallback)
        if found is None:
            return None
        step, state, meta = found
        return step, state["params"], state["opt_state"], meta

    def _abstract_train_state(self) -> dict:
        return {"params": self.abstract_params(), "opt_state": self.abstract_opt_state(),
                "step": jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=NamedSharding(self.mesh, P()))}

    @property
    def shapes(self) -> StepShapes:
        c = self.config
        return StepShapes(
            prompts_per_step=c.prompts_per_step, group_size=c.group_size, rows=c.prompts_per_step * c.group_size,
            mini_batch=c.mini_batch, micro_batch=c.micro_batch, prompt_len=self.rollout_cfg.max_prompt_length,
            context_len=self.rollout_cfg.context_length(self.rollout_cfg.max_prompt_length),
            vocab_size=self.model_cfg.vocab_size)

    def close(self):
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.retriever is not None:
            self.retriever.close()


def _abstract_policy_from_config(cfg: ml_collections.ConfigDict, mesh: Mesh):
    """(graphdef, abstract params with shardings, model config, tokenizer or None) without weights:
    the shape from the checkpoint's config.json or model.arch; the vocabulary from arch, the
    checkpoint or, failing both, the tokenizer directory."""
    tok_dir = cfg.tokenizer or cfg.checkpoint
    tokenizer = load_tokenizer(tok_dir) if tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer.json")) else None
    hf_config = os.path.join(os.path.expanduser(cfg.checkpoint), "config.json") if cfg.checkpoint else ""
    if hf_config and os.path.isfile(hf_config):
        model_cfg = qwen2.Qwen2Config.from_hf_config(hf_config, **model_overrides(cfg))
    else:  # no checkpoint, or one not on this machine: the shape model.arch states
        arch = dict(cfg.arch.to_dict()) if hasattr(cfg.arch, "to_dict") else dict(cfg.arch)
        if "vocab_size" not in arch:
            if tokenizer is None:
                raise ValueError("abstract mode needs the vocabulary size: set model.arch.vocab_size, or make "
                                 "model.checkpoint's config.json or model.tokenizer readable here")
            arch["vocab_size"] = tokenizer.vocab_size
        eos = tokenizer.eos_id if tokenizer is not None else arch.pop("eos_token_id", 0)
        model_cfg = qwen2.Qwen2Config(eos_token_id=eos, **arch, **model_overrides(cfg))
    model = qwen2.abstract_model(model_cfg)
    params = params_of(model)
    return nnx.graphdef(model), _abstract_params_on(params, shd.state_shardings(params, mesh)), model_cfg, tokenizer
