"""The command line: `python train.py STAGE [options]` (or `palm-rlhf STAGE` once installed).

    python train.py                         # pretrain the "cpu" preset on enwik8 (downloaded if missing)
    python train.py pretrain --data enwik6  # the first 1 MB of enwik8, or any text file (raw, .gz, .zip)
    python train.py sample --init CKPT      # see what any stage's model writes
    python train.py STAGE --help            # every option of a stage, with its default

Several GPUs (or CPU processes): `accelerate launch train.py ...` or `torchrun --nproc_per_node N train.py ...`.

Every training flag is generated from a stage's config dataclass (name, type, default, help); each command only
builds the objects and calls the library's trainer.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from dataclasses import dataclass, fields, is_dataclass

import torch

from .checkpoint import read_model
from .data import DATASETS, encode_text, load_corpus, prompt_sampler
from .demo import PreferenceTaskConfig, make_preference_files
from .dpo import DPOConfig, DPOTrainer
from .feedback import load_prompts_file
from .ilql import ILQLConfig, ILQLModel, ILQLTrainer
from .judges import JUDGES, judge_reward, load_judge
from .label import FileCandidates, LabelConfig, LabelStore, SampledCandidates, reward_scorer, serve
from .lora import LoRAConfig
from .palm import PRESETS, PaLM, PaLMConfig
from .policy import ActorCritic, Policy
from .grpo import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from .ppo import PPOConfig, PPOTrainer
from .pretrain import PretrainConfig, PretrainTrainer
from .reward import RewardConfig, RewardModel, RewardTrainer
from .sampling import generate
from .sft import SFTConfig, SFTTrainer
from .training import resume_path
from .utils import ConfigError, option, require

# -------------------------------------------------------------------------------------------- flags from configs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser, cls, prefix: str = "", skip: tuple = ()) -> None:
    """One flag per field of dataclass `cls` (nested dataclasses flattened: lora.r -> --lora-r)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        name, default = prefix + f.name, f.default
        if is_dataclass(default):
            add_config_args(parser, type(default), prefix=f"{name}_")
            continue
        kind = str(f.type).split(" |")[0]
        kw = dict(dest=name, default=default,
                  help=argparse.SUPPRESS if f.metadata.get("hidden") else help_of(cls, f.name) or " ")
        if kind == "bool":
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif kind == "tuple[float, float]":
            parser.add_argument(flag(name), type=float, nargs=2, metavar=("A", "B"), **kw)
        elif kind == "tuple[str, ...]":
            parser.add_argument(flag(name), nargs="+", metavar="NAME", **kw)
        else:
            parser.add_argument(flag(name), type={"int": int, "float": float, "str": str}[kind],
                                choices=f.metadata.get("choices"), **kw)


def help_of(cls, name: str) -> str:
    """A field's help text: a stage that only changes a default inherits the text of the field it overrides."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and "help" in field.metadata:
            return field.metadata["help"]
    return ""


def config_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    """Build dataclass `cls` from the flags add_config_args made (a ConfigError carries the flag's full name)."""
    values = {}
    for f in fields(cls):
        if not hasattr(args, prefix + f.name) and not is_dataclass(f.default):
            continue
        values[f.name] = (config_from_args(type(f.default), args, prefix=f"{prefix}{f.name}_")
                          if is_dataclass(f.default) else getattr(args, prefix + f.name))
    try:
        return cls(**values)
    except ConfigError as err:
        err.name = prefix + err.name  # lora.r -> lora_r, named as the flag --lora-r
        raise


def format_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class CLIError(ValueError):
    """A bad flag, named as the user typed it."""

# ---------------------------------------------------------------------------------------------------- commands


def pretrain(args) -> dict:
    cfg = config_from_args(PretrainConfig, args)
    resume = resume_path(args.resume, cfg.checkpoint_dir)
    model_config = (PaLMConfig.from_dict(read_model(resume)[0]["model"]) if resume  # a resumed run keeps its model
                    else PaLMConfig.preset(args.preset, **model_overrides(args.model)))
    corpus = load_corpus(args.data, data_dir=args.data_dir)
    torch.manual_seed(cfg.seed)
    trainer = PretrainTrainer(PaLM(model_config), corpus, cfg, metadata={"data": args.data})
    return trainer.train(resume=args.resume)


def model_overrides(pairs: list[str]) -> dict:
    """["dim=128", "qk_norm=true"] -> {"dim": 128, "qk_norm": True}, typed like PaLMConfig's fields."""
    types = {f.name: str(f.type) for f in fields(PaLMConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CLIError(f"--model expects KEY=VALUE, got {pair!r}")
        if key not in types:
            raise CLIError(f"--model {key}: not a PaLMConfig field; fields are {sorted(types)}")
        cast = {"bool": lambda v: v.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(types[key], str)
        try:
            out[key] = cast(value)
        except ValueError:
            raise CLIError(f"--model {pair}: {key} takes a {types[key]}") from None
    return out


def make_preferences(args) -> dict:
    cfg = config_from_args(PreferenceTaskConfig, args)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = PaLM.load(args.init).to(device).eval()
    return make_preference_files(model, load_corpus(args.data, data_dir=args.data_dir), args.out, cfg)


def sft(args) -> dict:
    cfg = config_from_args(SFTConfig, args)
    torch.manual_seed(cfg.seed)  # adapter initialisation
    model = PaLM.load(args.init)
    return SFTTrainer(model, args.train, cfg, val=args.val, metadata=inputs(args)).train(resume=args.resume)


def reward(args) -> dict:
    cfg, lora = config_from_args(RewardConfig, args), config_from_args(LoRAConfig, args, prefix="lora_")
    torch.manual_seed(cfg.seed)  # adapter and head initialisation
    rm = RewardModel(PaLM.load(args.init), lora=lora, num_bins=cfg.num_bins if cfg.objective == "bins" else None,
                     pool=cfg.pool)
    trainer = RewardTrainer(rm, args.train, cfg, val=args.val, gold_fn=gold_judge(args), metadata=inputs(args))
    return trainer.train(resume=args.resume)


ONLINE = {"ppo": (PPOConfig, PPOTrainer, ActorCritic), "grpo": (GRPOConfig, GRPOTrainer, Policy),
          "rloo": (RLOOConfig, RLOOTrainer, Policy)}


def online_rl(args) -> dict:
    """ppo, grpo, rloo: a policy (+ critic for PPO) trained online against a reward model or a reward function."""
    config_cls, trainer_cls, policy_cls = ONLINE[args.stage]
    cfg, lora = config_from_args(config_cls, args), config_from_args(LoRAConfig, args, prefix="lora_")
    if (args.reward is None) == (args.reward_fn is None):
        raise CLIError("give one reward: --reward RM (a reward model) or --reward-fn JUDGE (a function of the text)")
    torch.manual_seed(cfg.seed)  # adapter initialisation
    policy = policy_cls(PaLM.load(args.init), lora=lora)
    reward = RewardModel.load(args.reward) if args.reward else judge_reward(load_judge(args.reward_fn))
    prompts = (load_prompts_file(args.prompts) if args.prompts else
               prompt_sampler(load_corpus(args.data, data_dir=args.data_dir), args.prompt_len))
    trainer = trainer_cls(policy, reward, prompts, cfg, gold_fn=gold_judge(args), metadata=inputs(args))
    return trainer.train(resume=args.resume)


def dpo(args) -> dict:
    cfg, lora = config_from_args(DPOConfig, args), config_from_args(LoRAConfig, args, prefix="lora_")
    torch.manual_seed(cfg.seed)  # adapter initialisation
    policy = Policy(PaLM.load(args.init), lora=lora)
    trainer = DPOTrainer(policy, args.train, cfg, val=args.val, gold_fn=gold_judge(args), metadata=inputs(args))
    return trainer.train(resume=args.resume)


def label(args) -> dict:
    cfg = config_from_args(LabelConfig, args)
    store = LabelStore(args.out, overlap=cfg.overlap, lease_s=cfg.lease_s, seed=cfg.seed)
    if args.export:
        summary = store.export()
        print(f"{summary['pairs']} pairs and {summary['rankings']} rankings -> {summary['preferences']}; "
              f"{summary['demonstrations']} demonstrations -> {summary['demos']}; left out: {summary['left_out']}")
        return summary
    if (args.init is None) == (args.candidates is None) or (args.init is not None) != (args.prompts is not None):
        raise CLIError("give --init CKPT --prompts FILE (responses sampled from a model) or --candidates FILE "
                       "(responses written elsewhere), or --export")
    if args.candidates:
        source = FileCandidates(args.candidates, cfg)
    else:
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        source = SampledCandidates(PaLM.load(args.init).to(device), load_prompts_file(args.prompts), cfg)
    score = reward_scorer(RewardModel.load(args.reward)) if args.reward else None
    return serve(store, source, cfg, host=args.host, port=args.port, token=args.token, score=score)


def ilql(args) -> dict:
    cfg, lora = config_from_args(ILQLConfig, args), config_from_args(LoRAConfig, args, prefix="lora_")
    torch.manual_seed(cfg.seed)  # adapter and head initialisation
    model = ILQLModel(PaLM.load(args.init), lora=lora)
    trainer = ILQLTrainer(model, args.train, cfg, val=args.val, gold_fn=gold_judge(args), metadata=inputs(args))
    return trainer.train(resume=args.resume)


def gold_judge(args):
    return load_judge(args.gold) if args.gold else None


def inputs(args) -> dict:
    """The command's input paths, kept in checkpoints as provenance (e.g. scripts/ppo_heldout.py reads them)."""
    keys = ("init", "train", "val", "reward", "reward_fn", "gold", "prompts", "data", "prompt_len")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


@dataclass
class SampleConfig:
    max_new_tokens: int = option(256, "bytes to generate per sample")
    temperature: float = option(0.8, "sampling temperature (0 = greedy)")
    top_k: int | None = option(None, "sample among the k most likely bytes only")
    top_p: float | None = option(None, "nucleus sampling: the smallest set of bytes with this much probability")
    n: int = option(1, "samples per prompt (one is streamed as it is written)")
    seed: int = option(0, "sampling seed")

    def __post_init__(self):
        require(self.max_new_tokens >= 1, self, "max_new_tokens", "must be >= 1")
        require(self.n >= 1, self, "n", "must be >= 1")


def sample(args) -> list[str]:
    """Sample from any stage's model: --prompt TEXT once, or an interactive loop reading prompts from stdin."""
    cfg = config_from_args(SampleConfig, args)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = PaLM.load(args.init).to(device).eval()
    room = model.config.max_seq_len - cfg.max_new_tokens
    if room < 1:
        raise CLIError(f"--max-new-tokens {cfg.max_new_tokens}: leaves no room for a prompt in this model's "
                       f"{model.config.max_seq_len} positions")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if args.prompt is not None:
        return write_samples(model, unescape(args.prompt), cfg, generator, room)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{args.init}: type a prompt and press Enter (Ctrl-D to quit)")
    outputs = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return outputs
        if line.strip():
            outputs += write_samples(model, unescape(line), cfg, generator, room)


def unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def write_samples(model, prompt: str, cfg: SampleConfig, generator, room: int) -> list[str]:
    tokens = encode_text(prompt)[-room:]
    if len(tokens) == 0:
        raise CLIError("--prompt is empty: give at least one character")
    device = next(model.parameters()).device
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stream = (lambda t, real: print(decoder.decode(bytes([int(t[0])])), end="", flush=True)) if cfg.n == 1 else None
    if cfg.n == 1:
        print(prompt, end="", flush=True)
    gen = generate(model, [tokens.to(device)] * cfg.n, cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, on_token=stream)
    texts = [bytes(t[m].tolist()).decode("utf-8", errors="replace") for t, m in zip(gen.tokens.cpu(), gen.mask.cpu())]
    if cfg.n == 1:
        print(decoder.decode(b"", final=True))
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{prompt}{text}")
    return texts

# ---------------------------------------------------------------------------------------------------- parser


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def data_args(p) -> None:
    p.add_argument("--data", default="enwik8", help=f"a text file (raw, .gz or .zip) or a dataset name "
                   f"({', '.join(DATASETS)}: fetched into --data-dir and checked on first use)")
    p.add_argument("--data-dir", default="data", help="where named datasets are stored")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="stage")
    stage = lambda name, help: sub.add_parser(name, help=help, description=help, formatter_class=Formatter)  # noqa: E731
    resume = "resume from this checkpoint ('auto' = CHECKPOINT_DIR/last.pt when there)"

    p = stage("pretrain", "next-byte pretraining, reports validation bits per character")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model size")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="override PaLMConfig fields")
    data_args(p)
    p.add_argument("--resume", default=None, help=resume)
    add_config_args(p, PretrainConfig)

    p = stage("make-preferences", "the demo task: sample pairs from a model, label them with the gold judge "
                                  "(noisy), write train/val JSONL and SFT demonstrations")
    p.add_argument("--init", required=True, help="model that writes the responses (any stage's checkpoint)")
    data_args(p)
    p.add_argument("--out", default="data/demo", help="folder for train.jsonl, val.jsonl, demos.jsonl, stats.json")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_config_args(p, PreferenceTaskConfig)

    gold = (f"also score against a known judge: {', '.join(JUDGES)} or module:function (a bare --gold: prose, the "
            f"demo task's)")
    for name, help, config in (("sft", "supervised fine-tuning on demonstrations (loss on response tokens only)",
                                SFTConfig),
                               ("reward", "reward model from preferences (Bradley-Terry), ratings (bins) or "
                                          "regression", RewardConfig),
                               ("dpo", "direct preference optimisation (DPO / IPO) of a policy on preference pairs",
                                DPOConfig),
                               ("ilql", "offline RL (ILQL) on scored responses {prompt, response, reward}: Q and V "
                                        "heads that steer sampling", ILQLConfig)):
        p = stage(name, help)
        p.add_argument("--init", required=True, help="the model to start from (pretrain or SFT checkpoint/model)")
        p.add_argument("--train", required=True, help="JSONL file (formats: palm_rlhf/feedback.py, README)")
        p.add_argument("--val", default=None, help="held-out JSONL; default: the last --val-fraction of --train")
        p.add_argument("--resume", default=None, help=resume)
        if name != "sft":
            p.add_argument("--gold", nargs="?", const="prose", default=None, metavar="JUDGE", help=gold)
            add_config_args(p, LoRAConfig, prefix="lora_")
        add_config_args(p, config)

    for name, help in (("ppo", "RLHF: PPO against a frozen reward model (or function), KL-penalised to the reference "
                               "policy"),
                       ("grpo", "critic-free RL: GRPO (group-normalised advantages, k3 KL in the loss)"),
                       ("rloo", "critic-free RL: RLOO (leave-one-out baseline, KL folded into the reward)")):
        p = stage(name, help)
        p.add_argument("--init", required=True, help="the policy to start from (and its reference)")
        p.add_argument("--reward", default=None, help="reward model (train.py reward's checkpoint or model folder)")
        p.add_argument("--reward-fn", default=None, metavar="JUDGE",
                       help=f"a reward function of the response text instead of a model: {', '.join(JUDGES)} or "
                            f"module:function (text -> float)")
        p.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...}; default: windows of --data')
        data_args(p)
        p.add_argument("--prompt-len", type=int, default=32, help="window length when prompts come from --data")
        p.add_argument("--gold", nargs="?", const="prose", default=None, metavar="JUDGE", help=gold)
        p.add_argument("--resume", default=None, help=resume)
        add_config_args(p, LoRAConfig, prefix="lora_")
        add_config_args(p, ONLINE[name][0])

    p = stage("label", "human feedback: a web page to compare, rank and write responses; exports what reward and sft "
                       "take")
    p.add_argument("--init", default=None, help="model whose samples are labelled (with --prompts)")
    p.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} to sample responses for')
    p.add_argument("--candidates", default=None,
                   help='instead of a model: JSONL of {"prompt": ..., "responses": [...]} written by any system')
    p.add_argument("--out", default="feedback", help="folder of the labelling session's logs and exports")
    p.add_argument("--reward", default=None, help="a reward model whose agreement with the labels the stats show")
    p.add_argument("--export", action="store_true", help="only write --out's export files from its logs, and exit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (other than loopback needs --token)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on")
    p.add_argument("--token", default=None, help="a shared secret every request must carry (the URL's ?token=)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_config_args(p, LabelConfig)

    p = stage("sample", "generate from any stage's model: --prompt TEXT, or an interactive prompt loop")
    p.add_argument("--init", required=True, help="checkpoint or model folder (pretrain, SFT, reward trunk, PPO policy)")
    p.add_argument("--prompt", default=None, help="the prompt (escapes like \\n work); none: read prompts from stdin")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_config_args(p, SampleConfig)
    return parser


COMMANDS = {"pretrain": pretrain, "make-preferences": make_preferences, "sft": sft, "reward": reward,
            "ppo": online_rl, "grpo": online_rl, "rloo": online_rl,
            "dpo": dpo, "ilql": ilql, "label": label, "sample": sample}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["pretrain", *argv]  # `python train.py [options]` pretrains
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None):
    """Run one command; returns what it returns (a trainer's summary). Errors propagate (see `run`)."""
    args = parse_args(argv)
    try:
        return COMMANDS[args.stage](args)
    except ConfigError as err:  # a bad setting, whether the config or a trainer (e.g. against the model) found it
        raise CLIError(f"{flag(err.name)} {format_value(err.value)}: {err.why}") from None


def run(argv: list[str] | None = None) -> None:
    """The console entry point: `main`, with errors and Ctrl-C reported in one readable line instead of a
    traceback, and a clean exit for multi-process runs."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    argv = list(sys.argv[1:] if argv is None else argv)
    code = 0
    try:
        main(argv)
    except KeyboardInterrupt:
        again = argv if "--resume" in argv else [*argv, "--resume", "auto"]
        trains = not argv or argv[0] not in ("sample", "make-preferences", "label")
        print("\nstopped; nothing half-written was saved." + (
            f" Continue with: python train.py {' '.join(again)}" if trains else ""), file=sys.stderr)
        code = 130
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    if distributed:
        # gloo worker threads can abort the interpreter at shutdown (SIGABRT); all work is done and saved here
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os._exit(code)
    sys.exit(code)
