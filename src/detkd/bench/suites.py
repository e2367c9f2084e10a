"""The benchmark suites: the ONE file a new benchmark row touches.

A suite is its data, its teacher-student pairs and its seeds; a pair lists its method rows. To add a row, add the
method's key to a pair's ``methods`` (``"kd+fitnet"`` composes methods), with per-method settings in
``method_overrides`` if it needs any; to add a pair or a suite, add a :class:`Pair` or a :class:`Suite`. A method
joins the goals table of the report through its class attribute ``Distiller.benchmark_goal``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSpec:
    """The digits dataset a suite uses (generated once and cached)."""

    difficulty: str = "hard"
    train: int = 2000
    val: int = 300
    size: int = 128
    seed: int = 1


@dataclass
class Pair:
    """A teacher/student pair and the rows trained for it.

    Attributes:
        name: short name (``frcnn``).
        teacher: teacher detector (None: only teacher-free rows).
        student: student detector.
        methods: rows of distillation methods (``"kd+fitnet"`` composes).
        teacher_iters: teacher schedule (trained once per suite and data).
        student_iters: schedule of every student row.
        overrides: config overrides for every run of the pair (teacher included).
        student_overrides: overrides for student rows only (baselines and methods).
        method_overrides: per-method extra overrides.
        references: extra student-alone rows ``{key: (detector, overrides)}``, e.g. the real-valued R18 next to a
            binary student.
        variants: method rows with settings of their own ``{row: (methods, overrides)}``, e.g. ``gkd`` with its
            global loss on next to the default ``gkd`` row; trained like method rows, not timed.
        time_matched: train same-wall-clock baselines.
        feature_methods: methods held to the step-overhead goal (feature/logit methods).
    """

    name: str
    teacher: str | None
    student: str
    methods: list[str]
    teacher_iters: int
    student_iters: int
    overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    references: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    variants: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    time_matched: bool = True
    feature_methods: list[str] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    description: str
    data: DataSpec
    pairs: list[Pair]
    seeds: int = 3
    time_grid: float = 0.25  # time-matched iterations: baseline iters x ratio rounded up to this grid
    timing_steps: int = 12
    eval_images: int | None = None
    speed: list[str] = field(default_factory=list)  # detectors whose step time and latency are tabulated


FEATURE_LOGIT = ["fitnet", "kd", "fgfi", "defeat", "kd+fitnet"]
# Recipes for students that do not train well with the SGD default (see configs/): DETRs and 1-bit networks want
# AdamW and their own clipping.
DETR = [
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.0001",
    "optim.steps=[0.8]",
    "optim.warmup_iters=50",
    "optim.clip_grad_norm=0.1",
]
BINARY = [
    "model.binary_neck=true",
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.0001",
    "optim.clip_grad_norm=7.0",
]

# Feature-imitation terms are sums of squares over channels: against a teacher trained from scratch they start
# 10 to 10^4 times larger than the detection loss (about 1-3 at step 10) and, at the papers' weights, swamp it (the
# gradient norm is then the clip value at every step). Each method's feature terms get one factor, 10^-round(log10 F),
# where F is the method's weighted feature loss at step 10 of a 60-step R18 run against the R50 teacher halfway
# through its schedule (fitnet 16, fgfi 843, defeat 640 fg + 4 x 2800 bg, tar 870, gkd 2.6 fg + 4 x 43 bg); the
# ratios between a method's own terms and its soft-label weights stay the papers'. Measured once, not tuned on val.
FEATURE_SCALE = {
    "fitnet": ["distill.weights.fitnet=0.1"],
    "fgfi": ["distill.weights.fgfi=0.001"],
    "defeat": [
        "distill.options.defeat.term_weights.kd_feat_fg=0.0001",
        "distill.options.defeat.term_weights.kd_feat_bg=0.0004",
    ],
    "tar": ["distill.options.tar.term_weights.kd_feat=0.001"],
    "gkd": ["distill.options.gkd.term_weights.kd_feat_fg=0.01", "distill.options.gkd.term_weights.kd_feat_bg=0.04"],
}

# The same measurement on the RetinaNet pair (R18 against the R50 teacher at step 700 of 1500): fitnet 8.6 (0.1, as
# above), gkd 3.9 fg + 4 x 4.1 bg = 20 (0.1: RetinaNet's sampled background is smaller than Faster R-CNN's).
RETINANET_FEATURE_SCALE = {
    "fitnet": ["distill.weights.fitnet=0.1"],
    "gkd": ["distill.options.gkd.term_weights.kd_feat_fg=0.1", "distill.options.gkd.term_weights.kd_feat_bg=0.4"],
}
LGD_SCRATCH = ["distill.options.lgd.freeze_backbone_frac=0.0"]
# GKD's released config leaves the global (prototype-relation) loss off; the paper has it on.
GKD_GLOBAL = {"gkd-global": ("gkd", ["distill.options.gkd.global_loss=true"])}

SUITES: dict[str, Suite] = {
    "smoke": Suite(
        "smoke",
        "pipeline check only: a few steps of everything on tiny data; the numbers mean nothing",
        DataSpec("easy", 32, 16, 64, 0),
        [
            Pair(
                "frcnn",
                "frcnn_r18",
                "frcnn_r18",
                ["kd", "fitnet"],
                6,
                4,
                overrides=[
                    "model.min_size=64",
                    "model.max_size=64",
                    "data.batch_size=4",
                    "optim.warmup_iters=2",
                    "distill.check_teacher=0",
                ],
                feature_methods=["kd", "fitnet"],
            )
        ],
        seeds=1,
        timing_steps=3,
    ),
    "demo": Suite(
        "demo",
        "the README's demo: a slim Faster R-CNN R50 teacher, an R18 student alone and with kd+fitnet",
        DataSpec("easy", 1000, 200, 128, 0),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["kd+fitnet"],
                500,
                250,
                time_matched=False,
                feature_methods=["kd+fitnet"],
            )
        ],
        seeds=1,
        timing_steps=6,
    ),
    "cpu": Suite(
        "cpu",
        "slim detectors on the hard digits variant, sized for a 2-core CPU",
        DataSpec("hard", 2000, 300, 128, 1),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["tar", "gkd", "fitnet", "kd", "fgfi", "defeat"],
                2000,
                300,
                method_overrides=FEATURE_SCALE,
                feature_methods=["fitnet", "kd", "fgfi", "defeat"],
            ),
            # Teacher-free LGD on the same R18 student: its baseline and same-wall-clock runs are the frcnn pair's
            # (shared run folders). From scratch, LGD's backbone freeze only delays training.
            Pair("lgd", None, "frcnn_r18", ["lgd"], 0, 300, method_overrides={"lgd": LGD_SCRATCH}),
            # RetinaNet's heads need GroupNorm (the slim preset has it) to learn from scratch in a few hundred steps.
            Pair(
                "retinanet",
                "retinanet_r50",
                "retinanet_r18",
                ["gkd", "fitnet", "kd", "lgd"],
                1500,
                300,
                method_overrides={**RETINANET_FEATURE_SCALE, "lgd": LGD_SCRATCH},
                variants=GKD_GLOBAL,
                feature_methods=["fitnet", "kd"],
            ),
            Pair("lgd_r50", None, "retinanet_r50", ["lgd"], 0, 300, method_overrides={"lgd": LGD_SCRATCH}),
            Pair(
                "binary",
                "frcnn_r50",
                "frcnn_bireal18",
                ["ida"],
                2000,
                300,
                student_overrides=BINARY,
                references={"real_r18": ("frcnn_r18", [])},
            ),
            Pair("detr", "deformable_detr_r50", "deformable_detr_r18", ["detrdistill"], 2000, 500, overrides=DETR),
        ],
        seeds=3,
        time_grid=0.5,  # coarse: fewer same-wall-clock baselines, each rounded up (in the baseline's favour)
        speed=[
            "frcnn_r18",
            "frcnn_r50",
            "retinanet_r18",
            "retinanet_r50",
            "fcos_r18",
            "fcos_r50",
            "frcnn_bireal18",
            "deformable_detr_r18",
            "deformable_detr_r50",
        ],
    ),
    "gpu": Suite(
        "gpu",
        "larger images and schedules, more seeds: for a machine with a GPU",
        DataSpec("hard", 8000, 1000, 256, 1),
        [
            Pair(
                "frcnn",
                "frcnn_r50",
                "frcnn_r18",
                ["tar", "gkd", "fitnet", "kd", "fgfi", "defeat"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                method_overrides=FEATURE_SCALE,
                feature_methods=["fitnet", "kd", "fgfi", "defeat"],
            ),
            Pair(
                "retinanet",
                "retinanet_r50",
                "retinanet_r18",
                ["gkd", "fitnet", "kd", "lgd"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                method_overrides=RETINANET_FEATURE_SCALE,
                feature_methods=["fitnet", "kd"],
            ),
            Pair(
                "binary",
                "frcnn_r50",
                "frcnn_bireal18",
                ["ida"],
                12000,
                3000,
                overrides=["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
                student_overrides=BINARY,
                references={"real_r18": ("frcnn_r18", [])},
            ),
            Pair(
                "detr",
                "deformable_detr_r50",
                "deformable_detr_r18",
                ["detrdistill"],
                20000,
                6000,
                overrides=DETR + ["model.min_size=256", "model.max_size=256", "data.batch_size=16"],
            ),
        ],
        seeds=5,
        timing_steps=30,
    ),
}
