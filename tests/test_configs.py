"""Configs a user can trust: every shipped config (and variant) loads and adds no undeclared
key; every config key the code reads is declared in configs/base.py (and every declared key
is read); typed variants; one-line override-key errors with close matches; the rerun check
on a real train_config.json; the objective refuses data it would silently misuse."""

import ast
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import base  # noqa: E402
from embedjax.data import pipeline  # noqa: E402
from embedjax.train import config as train_config  # noqa: E402
from embedjax.train import sources  # noqa: E402
from embedjax.train import workdir as workdirs  # noqa: E402
from embedjax.train.loss_specs import check_objective_data  # noqa: E402
from embedjax.train.objective import Objective  # noqa: E402

# Every shipped config with every variant it takes.
VARIANTS = [
    "stsb_angle", "stsb_angle:smoke", "stsb_angle:smoke=4", "stsb_anchored", "stsb_anchored:smoke",
    "stsb_cosent", "stsb_cosent:smoke",
    "sick_simcse_sup", "sick_simcse_sup:smoke",
    "unsup_simcse", "unsup_simcse:smoke", "unsup_simcse:file=/tmp/corpus.txt,smoke",
    "stsb_matryoshka", "stsb_matryoshka:smoke",
    "stsb_2d", "stsb_2d:smoke", "stsb_2d:mode=adaptive", "stsb_2d:mode=2dmse", "stsb_2d:mode=espresso,smoke",
    "llm_lora", "llm_lora:smoke", "llm_lora:smoke,model_type=llama",
    "stsb_sick", "stsb_sick:smoke", "stsb_sick:pearson=1.0,rank=0.5,ema=0.99,mode=round_robin,lr=2e-5",
    "mined_distill", "mined_distill:smoke", "mined_distill:kl", "mined_distill:infonce",
    "beir_ir", "beir_ir:smoke", "beir_ir:fn=none,guide=1,negatives=0,nf_negatives=2,all=1,positives=2,lr=1e-5,epochs=2",
    "sick_angle", "sick_angle:smoke", "stsb_sick:sick_weight=0,pearson=1.0",
    "ir_sts", "ir_sts:smoke", "ir_sts:ir=2,anchor=0,guide=1,fn=none,lr=1e-5", "beir_ir:start=1,anchor=10",
    "beir_ir:gte=1,hardness=9,mode=round_robin",
    "stsb_cross_encoder", "stsb_cross_encoder:smoke", "stsb_cross_encoder:epochs=1,seed=2",
    "stsb_augsbert", "stsb_augsbert:smoke", "stsb_augsbert:silver=/tmp/silver.tsv",
    "beir_reranker", "beir_reranker:smoke", "beir_reranker:cpu,seed=2", "beir_reranker:loss=bce,in_batch=1,negatives=0,top_k=20,lr=1e-5,seed=1,epochs=2",
    "csts", "csts:smoke", "csts:family=cross", "csts:family=cross,smoke,seed=1,epochs=2", "csts:family=tri",
    "csts:family=tri,head=concat,loss=quadruplet,smoke", "csts:loss=quadruplet",
    "beir_splade", "beir_splade:smoke", "beir_splade:qw=0,dw=1e-4,lr=5e-5,epochs=2,seed=1,negatives=0,top_k=64",
    "beir_splade:inference_free,smoke",
    "beir_colbert", "beir_colbert:smoke", "beir_colbert:dim=96,doc_length=180,gradcache=8,lr=5e-5,epochs=2,seed=1,negatives=0",
    "beir_m3", "beir_m3:smoke", "beir_m3:no_distill,gradcache=8,lr=5e-5,epochs=2,seed=1,negatives=0",
    "static_stsb", "static_stsb:smoke", "static_stsb:model=/tmp/static,lr=1e-3,epochs=2",
    "tsdae_beir", "tsdae_beir:smoke", "tsdae_beir:steps=100,lr=1e-4,ratio=0.5,batch=16,seed=1",
    "llm2vec_mntp", "llm2vec_mntp:smoke", "llm2vec_mntp:all_mask,file=/tmp/corpus.txt,steps=100,lr=1e-4,seed=1",
    "llm2vec_mntp:probability=0.3,smoke=4",
    "llm2vec_simcse", "llm2vec_simcse:smoke", "llm2vec_simcse:init_from=/tmp/llm2vec_mntp,file=/tmp/wiki1m.txt",
    "llm2vec_simcse:smoke=4,init_from=/tmp/smoke_mntp,steps=100,lr=1e-4,seed=1",
]


def load(name: str):
    module, _, arg = name.partition(":")
    return importlib.import_module(f"configs.{module}").get_config(arg or None)


def declared_paths() -> dict:
    """Every declared key; what lies below a free-form section (``evals.dev.path``) is the section's content."""
    paths = train_config.config_paths(base.base_config().to_dict())
    return {p: v for p, v in paths.items() if not any(p.startswith(s + ".") for s in train_config.OPEN_SECTIONS)}


def undeclared(paths) -> list[str]:
    """Paths not declared in base_config (anything below a free-form dict is allowed)."""
    declared = declared_paths()
    return sorted(p for p in paths if p not in declared
                  and not any(p.startswith(s + ".") for s in train_config.OPEN_SECTIONS))


def test_every_shipped_config_is_covered():
    shipped = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "base"}
    assert shipped == {v.partition(":")[0] for v in VARIANTS}


@pytest.mark.parametrize("name", VARIANTS)
def test_config_loads_and_declares_nothing_new(name):
    c = load(name)
    paths = train_config.config_paths(c.to_dict())
    assert undeclared(paths) == []
    base_paths = declared_paths()
    for path, value in paths.items():  # same types as declared (ml_collections enforces most of it)
        want = base_paths[path] if path in base_paths else None
        if want is not None and not isinstance(want, dict):
            assert isinstance(value, (int, float) if isinstance(want, (int, float)) and not isinstance(want, bool)
                              else type(want)), (path, value, want)
    assert ("smoke" in name) == (c.num_steps in (4, 8))
    assert "testing" not in c and "pooling" not in c.objective


def test_variants_are_typed_and_checked():
    assert base.parse_arg("smoke,lr=1e-5,steps=8,x=true,y=False,name=abc,path=/a/b.txt") == {
        "smoke": True, "lr": 1e-5, "steps": 8, "x": True, "y": False, "name": "abc", "path": "/a/b.txt"}
    assert isinstance(base.parse_arg("lr=1e-5")["lr"], float) and isinstance(base.parse_arg("steps=8")["steps"], int)
    assert base.parse_arg(None) == base.parse_arg("") == {}
    with pytest.raises(ValueError, match="unknown config variant 'smok'; did you mean 'smoke'"):
        load("stsb_angle:smok")
    with pytest.raises(ValueError, match="mode must be"):
        load("stsb_2d:mode=2dmes")
    with pytest.raises(ValueError, match="even number of steps"):
        load("stsb_cosent:smoke=3")
    assert load("stsb_angle:smoke=4").num_steps == 4 and load("stsb_angle:smoke").num_steps == 8
    c = load("unsup_simcse:file=123")  # a file name that parses as a number stays a path
    assert c.data.train == "123" and c.data.kind == "sentences"
    assert load("unsup_simcse").data.kind == "stsb_sentences"


# ---------------------------------------------------------------------------- what the code reads

# Where a config (or a section of one) enters the code: (file, function) -> {parameter: prefix}.
# From there the scan follows calls that pass a section (``sources.train_source(config.data)``
# binds ``train_source``'s parameter to "data") and simple aliases (``d = config.data``).
SEEDS = {("embedjax/train/loop.py", "train_and_evaluate"): {"config": ""},
         ("scripts/train.py", "main"): {"_CONFIG.value": ""}}
MAPPING_METHODS = {"get", "items", "keys", "values", "to_dict", "to_json", "to_json_best_effort", "lock", "unlock",
                   "unlocked", "copy_and_resolve_references", "update", "ignore_type", "get_ref", "get_oneway_ref"}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class ConfigReads:
    """Static scan of the config keys the code reads (attribute, item and ``.get`` access)."""

    def __init__(self, files: dict[str, str], seeds=SEEDS, sections=None):
        self.trees = {name: ast.parse(src) for name, src in files.items()}
        self.sections = set(sections if sections is not None else
                            (p for p, v in declared_paths().items() if isinstance(v, dict)))
        self.defs: dict[str, list] = {}
        self.methods: dict[str, list] = {}  # "Class.method" -> [(file, node)]: a call on the class binds only these
        for name, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.defs.setdefault(node.name, []).append((name, node))
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            self.methods.setdefault(f"{node.name}.{item.name}", []).append((name, item))
        self.reads: dict[str, set] = {}   # dotted key -> {"file:line"}
        self.gets: dict[str, set] = {}    # keys read with .get(key, ...)
        self.bound: set = set()
        todo = []
        for (file, func), env in seeds.items():
            todo += [(file, node, env) for f, node in self.defs.get(func, []) if f == file]
        while todo:
            file, node, env = todo.pop()
            key = (file, node.lineno, tuple(sorted(env.items())))  # methods share names: the def's line
            if key in self.bound:
                continue
            self.bound.add(key)
            todo += self._scan(file, node, dict(env))

    def _resolve(self, expr, env):
        if isinstance(expr, ast.Name):
            return env.get(expr.id)
        if isinstance(expr, ast.Attribute):
            dotted = ast.unparse(expr)
            if dotted in env:
                return env[dotted]
            prefix = self._resolve(expr.value, env)
            if prefix is not None and expr.attr not in MAPPING_METHODS:
                return _join(prefix, expr.attr)
            return None
        if isinstance(expr, ast.Subscript) and isinstance(expr.slice, ast.Constant) and isinstance(expr.slice.value, str):
            prefix = self._resolve(expr.value, env)
            return None if prefix is None else _join(prefix, expr.slice.value)
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "get"
                and expr.args and isinstance(expr.args[0], ast.Constant) and isinstance(expr.args[0].value, str)):
            prefix = self._resolve(expr.func.value, env)
            return None if prefix is None else _join(prefix, expr.args[0].value)
        return None

    def _is_section(self, prefix) -> bool:
        return prefix is not None and (prefix == "" or prefix in self.sections)

    def _scan(self, file, func, env):
        # aliases first (a pass in source order is enough for straight-line code)
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                prefix = self._resolve(node.value, env)
                if self._is_section(prefix):
                    env[node.targets[0].id] = prefix
        calls = []
        for node in ast.walk(func):
            prefix = self._resolve(node, env) if isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)) else None
            if prefix:
                self.reads.setdefault(prefix, set()).add(f"{file}:{node.lineno}")
                if isinstance(node, ast.Call):
                    self.gets.setdefault(prefix, set()).add(f"{file}:{node.lineno}")
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                qualified = (f"{node.func.value.id}.{name}" if isinstance(node.func, ast.Attribute)
                             and isinstance(node.func.value, ast.Name) else None)
                targets = self.methods[qualified] if qualified in self.methods else self.defs.get(name, [])
                for target_file, target in targets:
                    params = [a.arg for a in target.args.posonlyargs + target.args.args]
                    if params[:1] in (["self"], ["cls"]):
                        params = params[1:]
                    bind = {}
                    for param, arg in [*zip(params, node.args),
                                       *((k.arg, k.value) for k in node.keywords if k.arg in params)]:
                        p = self._resolve(arg, env)
                        if self._is_section(p):
                            bind[param] = p
                    if bind:
                        calls.append((target_file, target, bind))
        return calls


def code_files() -> dict[str, str]:
    files = sorted((REPO / "embedjax").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    return {str(p.relative_to(REPO)): p.read_text() for p in files}


@pytest.fixture(scope="module")
def scan() -> ConfigReads:
    return ConfigReads(code_files())


def test_scan_finds_reads_through_calls_and_aliases(scan):
    """The scan itself: keys read in the loop, in functions it passes sections to, by every access form."""
    expected = {"model", "batch_size", "optim.learning_rate", "optim.accumulate", "objective.loss",
                "objective.gradcache_chunk", "data.kind", "data.tfds_name", "data.columns", "data.score_range",
                "mesh.data", "mesh.fsdp", "checkpoint.keep", "select_metric", "data.pack_length", "evals",
                "eval_batch_size"}
    assert expected <= set(scan.reads), sorted(expected - set(scan.reads))
    fake = {"m.py": "def run(config):\n    d = config.data\n    helper(d)\n    x = config['optim']['lr']\n"
                    "def helper(section):\n    return section.get('nope', 0)\n"}
    reads = ConfigReads(fake, seeds={("m.py", "run"): {"config": ""}}, sections={"data", "optim"})
    assert set(reads.reads) == {"data", "optim", "optim.lr", "data.nope"} and set(reads.gets) == {"data.nope"}


def test_every_key_the_code_reads_is_declared(scan):
    bad = {k: sorted(scan.reads[k]) for k in undeclared(scan.reads)}
    assert not bad, f"config keys read but not declared in configs/base.py: {bad}"


def test_every_declared_key_is_read(scan):
    declared = [p for p, v in declared_paths().items() if not isinstance(v, dict) or p in train_config.OPEN_SECTIONS]
    unread = [p for p in declared if p not in scan.reads]
    assert not unread, f"declared in configs/base.py but read nowhere: {unread}"


def test_objective_optim_sources_read_no_key_with_a_default(scan):
    mine = ("embedjax/train/objective.py", "embedjax/train/optim.py", "embedjax/train/sources.py")
    gets = {k: sorted(w for w in where if w.startswith(mine)) for k, where in scan.gets.items()}
    assert not {k: w for k, w in gets.items() if w}, "use item access so a missing key raises"


def test_base_declares_with_one_line_comments():
    """Every declared key's line in configs/base.py carries a comment (or the line above does)."""
    lines = (REPO / "configs" / "base.py").read_text().splitlines()
    body = lines[next(i for i, l in enumerate(lines) if l.startswith("def base_config")):]
    for path in declared_paths():
        leaf = path.rsplit(".", 1)[-1]
        hits = [i for i, l in enumerate(body) if f'c.{leaf} =' in l or f'"{leaf}":' in l]
        assert hits, path
        assert any("#" in body[i] or "#" in body[i - 1] for i in hits), f"{path}: no comment in configs/base.py"


# ---------------------------------------------------------------------------- overrides


def test_override_key_typos_name_close_matches():
    c = load("stsb_angle")
    train_config.check_override_keys(c, ["optim.learning_rate", "data.buckets", "optim", "objective.loss_kwargs",
                                       "objective.loss_kwargs.label_range", "hidden_dropout", "data.tfds_name"])
    with pytest.raises(ValueError) as err:
        train_config.check_override_keys(c, ["batch_size", "optim.learning_rat"])
    assert str(err.value) == "--config.optim.learning_rat: no such key; did you mean optim.learning_rate?"
    for typo, match in [("learning_rate", "optim.learning_rate"), ("data.colums", "data.columns"),
                        ("batchsize", "batch_size"), ("objective.pooling", "pooling")]:
        with pytest.raises(ValueError, match=rf"^--config\.{typo}: no such key; did you mean .*{match}"):
            train_config.check_override_keys(c, [typo])
    with pytest.raises(ValueError, match=r"^--config\.zzzz: no such key; see configs/base.py"):
        train_config.check_override_keys(c, ["zzzz"])
    with pytest.raises(ValueError, match=r"objective.loss_kwargs has no key 'label_rang'.*label_range.*whole dict"):
        train_config.check_override_keys(c, ["objective.loss_kwargs.label_rang"])
    for keys in (["optim.learning_rat"], ["objective.loss_kwargs.label_rang"], ["zzzz"]):
        with pytest.raises(ValueError) as err:
            train_config.check_override_keys(c, keys)
        assert "\n" not in str(err.value)


def test_override_keys_from_argv():
    argv = ["train.py", "--config", "configs/stsb_angle.py:smoke", "--config.optim.learning_rate=1e-5",
            "--config.batch_size", "64", "-config.seed=1", "--noconfig.objective.dropout", "--workdir=/tmp/w",
            "--", "--config.not_a_flag=1"]
    assert train_config.override_keys_from_argv(argv) == ["optim.learning_rate", "batch_size", "seed",
                                                        "objective.dropout"]


# ---------------------------------------------------------------------------- rerun


@pytest.fixture()
def saved_workdir(tmp_path):
    c = load("stsb_angle:smoke")
    (tmp_path / workdirs.CONFIG_FILE).write_text(c.to_json_best_effort(indent=2) + "\n")  # as the loop writes it
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # and a saved step: something to resume
    return tmp_path


def test_config_changes_on_real_json(saved_workdir):
    saved = json.loads((saved_workdir / workdirs.CONFIG_FILE).read_text())
    c = load("stsb_angle:smoke")
    assert workdirs.config_changes(saved, c.to_dict()) == []  # tuples vs lists, (0.0, 5.0) vs [0.0, 5.0]
    assert workdirs.config_changes(saved, c) == []  # a ConfigDict too
    # what does not change the run
    c.log_every, c.eval_every, c.eval_batch_size, c.sharding_rules = 1, 2, 7, "fsdp"
    c.mesh.data, c.mesh.fsdp, c.checkpoint.keep, c.checkpoint.every, c.checkpoint.keep_best = 2, 4, 9, 1, 3
    assert workdirs.config_changes(saved, c.to_dict()) == []
    # what does
    c.optim.learning_rate, c.batch_size, c.data.buckets = 2e-5, 64, (16, 32)
    c.objective.loss_kwargs.label_range = (0.0, 1.0)
    c.num_steps, c.pooling = 16, "cls"
    assert workdirs.config_changes(saved, c.to_dict()) == [
        "batch_size: 16 -> 64",
        "data.buckets: [16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 256] -> [16, 32]",
        "num_steps: 8 -> 16",
        "objective.loss_kwargs.label_range: [0.0, 5.0] -> [0.0, 1.0]",
        "optim.learning_rate: 1e-05 -> 2e-05",
        "pooling: None -> 'cls'",  # None: the checkpoint's own pooling
    ]


def test_config_changes_equivalences_and_absent_keys():
    saved = {"num_steps": 8.0, "num_epochs": 3, "optim": {"learning_rate": 1e-5, "accumulate": 1},
             "objective": {"loss_kwargs": {"scale": 20}}, "log_every": 5, "testing": {"kill_at_step": 3}}
    new = {"num_steps": 8, "num_epochs": 1.0, "optim": {"learning_rate": 1e-5, "accumulate": True},
           "objective": {"loss_kwargs": {}}, "log_every": 1}
    # num_epochs is not read when num_steps > 0; bool is not int; a removed kwarg is a change
    assert workdirs.config_changes(saved, new) == ["objective.loss_kwargs: (absent) -> {}",
                                                     "objective.loss_kwargs.scale: 20 -> (absent)",
                                                     "optim.accumulate: 1 -> True"]
    assert workdirs.config_changes({**saved, "num_steps": 0}, {**new, "num_steps": 0})[0] == "num_epochs: 3 -> 1.0"


def test_check_rerun(saved_workdir, tmp_path_factory):
    c = load("stsb_angle:smoke")
    assert workdirs.check_rerun(saved_workdir, c, allow_change=False) == []
    assert workdirs.check_rerun(tmp_path_factory.mktemp("fresh"), c, allow_change=False) == []  # no config.json
    c.optim.learning_rate, c.log_every = 2e-5, 1
    with pytest.raises(ValueError) as err:
        workdirs.check_rerun(saved_workdir, c, allow_change=False)
    msg = str(err.value)
    assert "optim.learning_rate: 1e-05 -> 2e-05" in msg and "--allow_config_change" in msg
    assert "log_every" not in msg and str(saved_workdir / workdirs.CONFIG_FILE) in msg
    assert workdirs.check_rerun(saved_workdir, c, allow_change=True) == ["optim.learning_rate: 1e-05 -> 2e-05"]
    (saved_workdir / workdirs.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        workdirs.check_rerun(saved_workdir, c, allow_change=False)


def test_a_run_that_saved_nothing_does_not_block_a_corrected_rerun(saved_workdir, tmp_path):
    """A first run that stopped on bad input (its config written, no step saved) is replaced by the
    corrected command; once a checkpoint or a summary exists, the same change is refused."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / workdirs.CONFIG_FILE).write_text((saved_workdir / workdirs.CONFIG_FILE).read_text())
    c = load("stsb_angle:smoke")
    c.data.train = "/data/sts-train-fixed.csv"
    assert not workdirs.has_progress(workdir)
    assert workdirs.check_rerun(workdir, c, allow_change=False) == []
    (workdir / "checkpoints" / "tmp").mkdir(parents=True)  # an unfinished save is not progress
    assert workdirs.check_rerun(workdir, c, allow_change=False) == []
    (workdir / "checkpoints" / "4").mkdir()
    assert workdirs.has_progress(workdir)
    with pytest.raises(ValueError, match="data.train"):
        workdirs.check_rerun(workdir, c, allow_change=False)
    (workdir / "checkpoints" / "4").rmdir()
    (workdir / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="data.train"):
        workdirs.check_rerun(workdir, c, allow_change=False)


# ---------------------------------------------------------------------------- objective vs data


def objective(loss, **kw):
    cfg = base.base_config().objective
    cfg.loss = loss
    cfg.loss_kwargs = kw
    return Objective.from_config(cfg, "mean")


def test_objective_from_config_is_strict():
    cfg = base.base_config().objective
    assert Objective.from_config(cfg, "cls").pooling == "cls"  # the caller's (resolved) pooling, only
    with pytest.raises(ValueError, match="resolved pooling"):
        Objective.from_config(cfg, "")
    with pytest.raises(KeyError):
        Objective.from_config({k: v for k, v in cfg.items() if k != "dropout"}, "mean")
    with pytest.raises(ValueError, match=r"unknown objective keys \['pooling'\]"):
        Objective.from_config({**cfg.to_dict(), "pooling": "cls"}, "mean")
    with pytest.raises(ValueError, match="unknown objective.loss 'cosine'"):
        objective("cosine")


SCORED = ("text_a", "text_b", "score")


@pytest.mark.parametrize("loss", ["infonce", "simcse_unsup"])
def test_refuses_contrastive_loss_on_scored_pairs(loss):
    with pytest.raises(ValueError, match=r"ignores scores.*objective.loss=cosent, angle or cosine_mse.*data.kind=pairs"):
        check_objective_data(objective(loss), SCORED, [0.0, 5.0])


@pytest.mark.parametrize("loss", ["angle", "cosent", "cosine_mse"])
def test_refuses_scored_loss_without_scores(loss):
    with pytest.raises(ValueError, match=r"needs a gold score.*data.kind=stsb"):
        check_objective_data(objective(loss), ("text_a", "text_b"), None)


@pytest.mark.parametrize("loss", ["angle", "cosine_mse"])
def test_refuses_a_label_range_that_does_not_cover_the_scores(loss):
    with pytest.raises(ValueError) as err:
        check_objective_data(objective(loss), SCORED, [0.0, 2.5, 5.0])  # default label_range (0, 1)
    msg = str(err.value)
    assert "[0, 5]" in msg and "objective.loss_kwargs.label_range=(lo, hi)" in msg and "(0, 5)" in msg
    check_objective_data(objective(loss, label_range=(0.0, 5.0)), SCORED, [0.0, 2.5, 5.0])
    with pytest.raises(ValueError, match=r"\[-1, 4\]"):
        check_objective_data(objective(loss, label_range=(0, 5)), SCORED, [-1.0, 4.0])
    with pytest.raises(ValueError, match="hi > lo"):
        check_objective_data(objective(loss, label_range=(5, 0)), SCORED, [1.0])


def test_label_range_only_checked_where_the_loss_reads_it():
    check_objective_data(objective("cosent"), SCORED, [0.0, 5.0])  # order only
    check_objective_data(objective("angle", ibn_w=0.0), SCORED, [0.0, 5.0])  # no in-batch term
    check_objective_data(objective("angle", ibn_rule="angle_emb"), SCORED, [0.0, 5.0])  # raw labels


@pytest.mark.parametrize("loss", ["angle", "cosent", "cosine_mse", "simcse_unsup"])
def test_refuses_hard_negatives_a_loss_ignores(loss):
    fields = ("text_a", "text_b", "text_n") + (("score",) if loss != "simcse_unsup" else ())
    with pytest.raises(ValueError, match=r"hard negatives \(text_n\).*ignores them.*objective.loss=infonce"):
        check_objective_data(objective(loss, label_range=(0, 5)), fields, [1.0])
    check_objective_data(objective("infonce"), ("text_a", "text_b", "text_n"), None)


def test_refuses_infonce_on_sentences_and_simcse_unsup_on_pairs():
    with pytest.raises(ValueError, match="objective.loss=simcse_unsup"):
        check_objective_data(objective("infonce"), ("text_a",), None)
    with pytest.raises(ValueError, match="objective.loss=infonce"):
        check_objective_data(objective("simcse_unsup"), ("text_a", "text_b"), None)
    check_objective_data(objective("simcse_unsup"), ("text_a",), None)


@pytest.fixture(scope="module")
def mined_file(tmp_path_factory) -> Path:
    """A small file as scripts/mine.py writes it (k = 2 negatives and the teacher's 3 scores)."""
    path = tmp_path_factory.mktemp("mined") / "train.jsonl"
    rows = [{"text_a": f"query {i}", "text_b": f"positive {i}", "text_n": [f"neg {i}a", f"neg {i}b"],
             "teacher": [0.9, 0.5, 0.4]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def mined_beir(tmp_path_factory, stsb_dir) -> Path:
    """Mined-negative files for configs/beir_ir.py's two sources, as scripts/mine.py --beir writes them:
    for each training query two corpus ids it has no judgment for."""
    from embedjax.data.retrieval_training import read_beir_training, write_hard_negatives

    d = tmp_path_factory.mktemp("mined_beir")
    for name in ("scifact", "nfcorpus"):
        records = read_beir_training(stsb_dir.parent / "beir" / name, "train")
        hashes = records.document_hashes[:64].tolist()  # candidates among the first 64 documents: enough
        negatives = []
        for i in range(len(records)):
            relevant = set(records[i]["relevant"])
            negatives.append([records.document_ids[j] for j, h in enumerate(hashes) if h not in relevant][i % 50:
                                                                                                      i % 50 + 2])
        write_hard_negatives(d / f"{name}_train.jsonl", list(records.query_ids), negatives)
    return d


@pytest.mark.parametrize("name", [v for v in VARIANTS if "file=" not in v])
def test_every_shipped_config_passes_on_its_data(name, stsb_dir, sick_dir, mined_file, mined_beir):
    """Every source of every shipped config (each mixture entry too) reads and suits its objective."""
    from embedjax.cross_encoder import HeadSpec
    from embedjax.train import encoders
    from embedjax.train.config import INITIAL_TEACHER, DataConfig, ModelConfig, source_sections
    from embedjax.train.cross_objective import CrossObjective, check_cross_data

    c = load(name)
    if name.startswith("mined_distill"):
        c.data.train = str(mined_file)
    if name.startswith("stsb_augsbert"):  # scripts/augment.py writes it first: a few lines in its format
        silver = mined_file.parent / "silver.tsv"
        silver.write_text("A man plays a guitar.\tSomeone plays an instrument.\t3.9\nA cat.\tThe market fell.\t0.21\n")
        c.data.train = str(silver)  # the config's default path is what scripts/mine.py writes first
    if name.startswith(("beir_ir", "ir_sts", "beir_reranker", "beir_splade", "beir_colbert", "beir_m3")):  # likewise the mined negatives: scripts/mine.py --beir writes them first
        for entry in (*c.data.mixture.values(), c.data):
            if entry.get("hard_negatives"):
                entry.hard_negatives = str(mined_beir / Path(entry.hard_negatives).name)
    sections = source_sections(c.data, c.objective)
    # "initial" (the run's own starting model) is the only teacher or guide a shipped config names
    frozen = {x for _, o, _ in sections.values() for x in (o["distill"]["teacher"], o["guide"])} - {None}
    teacher = (encoders.load_teacher(INITIAL_TEACHER, None, ModelConfig.from_config(c))
               if frozen == {INITIAL_TEACHER} else None)
    for data, objective_cfg, _ in sections.values():
        data = DataConfig.from_config(data)
        source = sources.train_source(data)
        fields, scores = pipeline.fields_of(source), sources.scores_of(source)
        assert (scores is None) == ("score" not in fields)
        if scores is not None:
            assert len(scores) == len(source) and np.isfinite(scores).all()
        if c.model_kind == "cross_encoder":
            objective = CrossObjective.from_config(objective_cfg, HeadSpec("first_token", c.num_labels))
            check_cross_data(objective, fields, scores, data.in_batch_negatives)
        elif c.model_kind == "splade":
            from embedjax.train.sparse_objective import SparseObjective

            objective = SparseObjective.from_config(objective_cfg, c.splade.to_dict())
            check_objective_data(objective, fields, scores)
        elif c.model_kind in ("colbert", "m3"):  # the records they read are InfoNCE's
            from embedjax.train.colbert_objective import ColbertObjective
            from embedjax.train.m3_objective import M3Objective

            kind = ColbertObjective if c.model_kind == "colbert" else M3Objective
            kind.check_section(objective_cfg)
            check_objective_data(Objective.from_config({**objective_cfg, "loss_kwargs": {}, "loss": "infonce"}, "mean"),
                                 fields, scores)
        else:
            objective = Objective.from_config(objective_cfg, "mean", teacher=teacher,
                                              tri_head=c.model_kind == "tri_encoder")
            check_objective_data(objective, fields, scores)
