"""The FineTuneJob spec: the one source of truth.

The CRD (`crds/finetunejob.yaml`), the validation messages, the trainer's config parsing and
the reference table in `docs/spec.md` are all generated from these classes. Each attribute's
docstring becomes its description in the CRD and the docs.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from kubetune.api.base import FreeForm, KubeModel, Quantity, Rule

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"

BUILTIN_TEMPLATES = ("glm4", "chatglm3", "internlm2", "llama3", "chatml", "qwen2")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "xtuner", "prompt_completion", "text")

PositiveInt = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1, max_length=253)]


class SecretKeyRef(KubeModel):
    """A key of a Secret in the job's namespace (secrets are only ever referenced)."""

    name: Name
    """Name of the Secret."""
    key: str = "token"
    """Key within the Secret."""


PACKAGE_SCHEME = "pkg:"
"""`model.path: pkg:<package>/<file>`: a file inside an installed Python package."""


class ModelSpec(KubeModel):
    """The base model: exactly one of `path`, `hfRepo` or `url`."""

    path: str | None = None
    """Directory or .gguf file holding the model, on a mounted volume or local disk
    (relative to the manifest), or `pkg:<package>/<file>` inside an installed Python package."""
    hf_repo: str | None = Field(default=None, alias="hfRepo")
    """Hugging Face Hub repository id, e.g. `THUDM/glm-4-9b-chat`."""
    revision: str | None = None
    """Branch, tag or commit of `hfRepo`."""
    token_secret: SecretKeyRef | None = None
    """Secret holding a Hub token for gated or private repositories."""
    url: str | None = Field(default=None, pattern=r"^https?://")
    """HTTP(S) URL of a model archive (.tar, .tar.gz, .zip) or a single .gguf file."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off unless you trust its source."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "(has(self.path) ? 1 : 0) + (has(self.hfRepo) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1",
            "exactly one of path, hfRepo or url must be set",
        ),
        Rule(
            "!has(self.revision) || has(self.hfRepo)",
            "revision is only used with hfRepo",
            ".revision",
        ),
        Rule(
            "!has(self.tokenSecret) || has(self.hfRepo)",
            "tokenSecret is only used with hfRepo",
            ".tokenSecret",
        ),
    )


class DatasetSpec(KubeModel):
    """One dataset source: exactly one of `path`, `url` or `hfRepo`."""

    path: str | None = None
    """A json, jsonl, parquet or csv file, or a directory of them."""
    url: str | None = Field(default=None, pattern=r"^https?://")
    """HTTP(S) URL of a json, jsonl, parquet or csv file."""
    hf_repo: str | None = Field(default=None, alias="hfRepo")
    """Hugging Face Hub dataset id."""
    split: str = "train"
    """Split to read from `hfRepo`."""
    format: Literal[DATASET_FORMATS] = "auto"  # type: ignore[valid-type]
    """Record format; `auto` detects it from the first record's fields."""
    system_prompt: str | None = None
    """System prompt for records that have none."""
    max_samples: PositiveInt | None = None
    """Read at most this many records (the first ones)."""
    repeat: float = Field(default=1.0, gt=0, le=10000)
    """Times each record is used per epoch; a fraction keeps a seeded random subset."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "(has(self.path) ? 1 : 0) + (has(self.url) ? 1 : 0) + (has(self.hfRepo) ? 1 : 0) == 1",
            "exactly one of path, url or hfRepo must be set",
        ),
    )


class DataSpec(KubeModel):
    """What the model learns from and how it is laid out in sequences."""

    datasets: list[DatasetSpec] = Field(min_length=1, max_length=64)
    """Dataset sources, mixed into one training set."""
    template: Literal[("auto", *BUILTIN_TEMPLATES, "custom")] = "auto"  # type: ignore[valid-type]
    """Chat template: `auto` (the tokenizer's own), a built-in one, or `custom` (chatTemplate)."""
    chat_template: str | None = Field(default=None, max_length=65536)
    """Inline Jinja chat template, used with `template: custom`."""
    cutoff_length: int | None = Field(default=None, ge=16, le=1048576)
    """Maximum tokens per sequence; longer samples are truncated."""
    packing: bool = False
    """Pack several samples into each sequence (attention never crosses samples)."""
    validation_split: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of samples held out for evaluation."""
    config_map: str | None = Field(
        default=None, alias="configMap", max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """On a cluster: a ConfigMap holding the files of relative dataset paths, one key per file
    name (`kubectl create configmap --from-file`, or a kustomize configMapGenerator); pods see
    them where the manifest's directory would be. Locally the files are read from disk. At most
    1 MiB in all; put larger data on a volume or behind a URL."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.template == 'custom' ? has(self.chatTemplate) : !has(self.chatTemplate)",
            "chatTemplate is required with template: custom and not allowed otherwise",
            ".chatTemplate",
        ),
        Rule(
            "!self.packing || has(self.cutoffLength)",
            "packing needs cutoffLength (the length of each packed sequence)",
            ".cutoffLength",
        ),
    )


class LoraSpec(KubeModel):
    """LoRA adapter settings (used by `lora` and `qlora`)."""

    r: int = Field(default=8, ge=1, le=4096)
    """Rank of the update matrices."""
    alpha: float = Field(default=16, gt=0)
    """Scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    """Module names to adapt, or `all-linear` for every linear layer but the output head."""
    rslora: bool = False
    """Rank-stabilised scaling (alpha / sqrt(r))."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""


class QuantizationSpec(KubeModel):
    """4-bit quantization of the frozen base (QLoRA, bitsandbytes)."""

    bits: Literal[4] = 4
    """Bits per weight of the frozen base."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype of the matmuls; `auto` follows training.precision."""


class MethodSpec(KubeModel):
    """How the weights are trained."""

    type: Literal["lora", "qlora", "full"] = "lora"
    """`lora`, `qlora` (LoRA on a 4-bit base) or `full` (every weight)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter settings for lora and qlora."""
    quantization: QuantizationSpec | None = None
    """Quantization of the base, required with qlora (`{}` takes the defaults)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.type != 'qlora' || has(self.quantization)",
            "type qlora needs quantization settings (use {} for nf4 with double quantization)",
            ".quantization",
        ),
        Rule(
            "self.type == 'qlora' || !has(self.quantization)",
            "quantization is only used with type qlora",
            ".quantization",
        ),
    )


class TrainingSpec(KubeModel):
    """Optimisation hyper-parameters."""

    epochs: float = Field(default=3.0, gt=0, le=1000)
    """Passes over the training set (ignored when maxSteps is set)."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    """Fraction of steps spent warming up linearly from zero."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Steps spent warming up (instead of warmupRatio)."""
    batch_size_per_device: int = Field(default=1, ge=1, le=4096)
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto`: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"] = "adamw"
    """Optimizer (8-bit and paged variants from bitsandbytes)."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """Decoupled weight decay."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm; 0 disables clipping."""
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    """Seed for data order, dropout and initialisation."""
    logging_steps: PositiveInt = 10
    """Log and publish metrics every N steps."""
    save_steps: PositiveInt | None = None
    """Checkpoint every N steps (and always at the end of each epoch)."""
    save_total_limit: PositiveInt = 3
    """Checkpoints kept; older ones are deleted once a newer one is complete."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!(has(self.warmupRatio) && has(self.warmupSteps))",
            "set warmupRatio or warmupSteps, not both",
            ".warmupSteps",
        ),
    )


class EvaluationSpec(KubeModel):
    """Evaluation on the validation split and sample generations."""

    every_steps: PositiveInt | None = None
    """Evaluate every N optimizer steps."""
    every_fraction: float | None = Field(default=None, gt=0, le=1)
    """Evaluate every fraction of the total steps (0.1 = ten times per run)."""
    sample_prompts: list[str] = Field(default_factory=list, max_length=64)
    """Prompts answered at each evaluation and by the exported model."""
    max_new_tokens: int = Field(default=128, ge=1, le=8192)
    """Length limit of sample answers."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!(has(self.everySteps) && has(self.everyFraction))",
            "set everySteps or everyFraction, not both",
            ".everyFraction",
        ),
    )


class DeepSpeedSpec(KubeModel):
    """DeepSpeed ZeRO settings, generated into a DeepSpeed config."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage; 0 means plain data parallelism (DDP)."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and parameters at stage 3) to CPU memory."""
    override: FreeForm | None = None
    """Raw DeepSpeed config merged over the generated one."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.offload == 'none' || self.zeroStage >= 2",
            "offload needs zeroStage 2 or 3",
            ".offload",
        ),
    )


class DistributedSpec(KubeModel):
    """How many machines and accelerators train together."""

    nodes: int = Field(default=1, ge=1, le=512)
    """Pods (one per node), joined by torchrun."""
    gpus_per_node: int = Field(default=1, ge=0, le=64)
    """Accelerators (and training processes) per pod; 0 trains on CPU."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """ZeRO sharding across all processes."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "self.nodes == 1 || self.gpusPerNode > 0",
            "gpusPerNode must be greater than 0 when nodes > 1",
            ".gpusPerNode",
        ),
    )


class Toleration(KubeModel):
    """A Kubernetes toleration (core/v1)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ResourcesSpec(KubeModel):
    """Resources and scheduling of every training pod."""

    gpu_resource_name: str = "nvidia.com/gpu"
    """Extended resource requested gpusPerNode times."""
    cpu: Quantity | None = None
    """CPU request and limit per pod."""
    memory: Quantity | None = None
    """Memory request and limit per pod."""
    shared_memory: Quantity = "8Gi"
    """Size of /dev/shm (NCCL and data loaders need more than the runtime's 64Mi)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate."""
    affinity: FreeForm | None = None
    """Pod affinity (core/v1 Affinity)."""
    priority_class_name: str | None = None
    """PriorityClass of the pods."""
    scheduler_name: str | None = None
    """Scheduler for the pods (e.g. volcano)."""
    queue_name: str | None = None
    """Kueue LocalQueue; the Job is created suspended and admitted by Kueue."""
    service_account_name: str | None = None
    """ServiceAccount the pods run as."""


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]


class ClaimTemplate(KubeModel):
    """A PersistentVolumeClaim the operator creates; it outlives the FineTuneJob."""

    size: Quantity
    """Requested storage."""
    storage_class_name: str | None = None
    """StorageClass; the cluster default when unset."""
    access_modes: list[AccessMode] = Field(default_factory=lambda: ["ReadWriteMany"], min_length=1)  # type: ignore[arg-type]
    """Access modes (multi-node jobs need ReadWriteMany)."""


class OutputSpec(KubeModel):
    """Where the adapter, the merged model and the checkpoints are written."""

    claim_name: str | None = None
    """An existing PersistentVolumeClaim."""
    claim_template: ClaimTemplate | None = None
    """A PersistentVolumeClaim to create (never deleted with the job)."""
    sub_path: str | None = Field(default=None, pattern=r"^[^/].*$")
    """Directory within the volume; defaults to the job's name. Runs go to `<subPath>/<run-id>`."""
    merge: bool = True
    """Merge the adapter into the (unquantized) base and export the full model."""
    max_shard_size: str = Field(default="2GB", pattern=r"^[0-9]+(KB|MB|GB|KiB|MiB|GiB)$")
    """Largest safetensors shard of the merged model."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype of the merged model; `auto` keeps the base model's."""
    keep_adapter: bool = True
    """Keep the adapter next to the merged model."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.claimName) != has(self.claimTemplate)",
            "set exactly one of claimName or claimTemplate",
        ),
    )


class RunPolicy(KubeModel):
    """Retries, deadlines and re-training."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Failed attempts retried (each resumes from the newest checkpoint)."""
    active_deadline_seconds: PositiveInt | None = None
    """Fail a run that has been active this long."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the FineTuneJob this long after it finished (outputs stay)."""
    suspend: bool = False
    """Pause: delete the pods, keep the checkpoints; resume when set back to false."""
    retrain_on_spec_change: bool = True
    """Start a new run when a training-relevant field of the spec changes."""
    termination_grace_period_seconds: int = Field(default=900, ge=30, le=86400)
    """Seconds a training pod has to save a checkpoint when it is stopped (preemption,
    suspend, node drain) before it is killed."""


class VolumeSpec(KubeModel):
    """An existing PersistentVolumeClaim mounted into the pods (models, datasets)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
    """Volume name."""
    claim_name: Name
    """The PersistentVolumeClaim."""
    mount_path: Annotated[str, Field(pattern=r"^/")]
    """Absolute path inside the pods."""
    read_only: bool = True
    """Mount read-only."""


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
RESERVED_ENV = (
    "NODE_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX", "KUBETUNE_RUN_ID",
    "KUBETUNE_IF_FINISHED",
)  # fmt: skip
"""Set by the operator or torchrun for the distributed launch: a spec may not override them."""


class KeyRef(KubeModel):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: Name
    """Name of the Secret or ConfigMap."""
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
    """Key within it."""


class EnvValueFrom(KubeModel):
    """Where an environment variable's value comes from: exactly one of the two."""

    secret_key_ref: KeyRef | None = None
    """A Secret's key (read by the kubelet; the operator never reads it)."""
    config_map_key_ref: KeyRef | None = None
    """A ConfigMap's key."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
            "set exactly one of secretKeyRef or configMapKeyRef",
        ),
    )


class EnvVar(KubeModel):
    """An environment variable of the training containers (e.g. storage credentials)."""

    name: Annotated[str, Field(pattern=ENV_NAME_PATTERN, max_length=253)]
    """Variable name (not one the distributed launch sets, e.g. NODE_RANK or RANK)."""
    value: str | None = None
    """A literal value (never a secret: use valueFrom)."""
    value_from: EnvValueFrom | None = None
    """A Secret's or ConfigMap's key."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
        Rule(
            "!(self.name in [" + ", ".join(f"'{n}'" for n in RESERVED_ENV) + "])",
            "is set by the distributed launch; choose another name",
            ".name",
        ),
    )


class EnvFrom(KubeModel):
    """Every key of a Secret or ConfigMap as environment variables: exactly one of the two."""

    secret_ref: Name | None = None
    """Name of a Secret."""
    config_map_ref: Name | None = None
    """Name of a ConfigMap."""
    prefix: Annotated[str, Field(pattern=ENV_NAME_PATTERN, max_length=253)] | None = None
    """Prepended to every variable name."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.secretRef) != has(self.configMapRef)",
            "set exactly one of secretRef or configMapRef",
        ),
    )


class ImageSpec(KubeModel):
    """Container image overrides."""

    trainer: str | None = None
    """Trainer image; the operator's default when unset."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    pull_secrets: list[str] = Field(default_factory=list)
    """Names of image pull Secrets."""


class FineTuneJobSpec(KubeModel):
    """A supervised fine-tuning run of a chat LLM."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "!has(self.model.tokenSecret) || !has(self.env) || "
            "!self.env.exists(e, e.name == 'HF_TOKEN')",
            "HF_TOKEN comes from model.tokenSecret; do not set it in env as well",
            ".env",
        ),
    )

    model: ModelSpec
    """The base model."""
    data: DataSpec
    """Datasets, chat template and sequence layout."""
    method: MethodSpec = Field(default_factory=MethodSpec)
    """LoRA, QLoRA or full fine-tuning."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimisation hyper-parameters."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Evaluation and sample generations."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Nodes, GPUs and DeepSpeed."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Pod resources and scheduling."""
    output: OutputSpec
    """Output volume and export settings."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadlines, suspension and re-training."""
    volumes: list[VolumeSpec] = Field(default_factory=list, max_length=16)
    """Extra volumes (models, datasets) mounted into the pods."""
    image: ImageSpec = Field(default_factory=ImageSpec)
    """Image overrides."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment of the training containers (credentials by reference)."""
    env_from: list[EnvFrom] = Field(default_factory=list, max_length=16)
    """Secrets or ConfigMaps whose every key becomes an environment variable."""
