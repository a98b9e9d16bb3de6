"""Every fixed fact of the project in one place: the dataset, normalization, artifact and model names.

Nothing here reads the environment or touches the disk; change a value here and every step follows.
"""

# --- CIFAR-10, official binary layout -------------------------------------------------------------
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
ARCHIVE_ENV = "CIFAR10_ARCHIVE"  # environment variable that names a local copy of the archive
BATCH_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCH = "test_batch.bin"
META_FILE = "batches.meta.txt"
FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)  # what we read of the batch folder, in this order

IMAGE_SHAPE = (3, 32, 32)  # channels, height, width: the order of the bytes in a record
IMAGE_BYTES = 3 * 32 * 32  # 1024 red, 1024 green, 1024 blue, each row-major 32x32
RECORD_BYTES = 1 + IMAGE_BYTES  # one label byte, then the pixels
NUM_CLASSES = 10
OFFICIAL_RECORDS = {"train": 50_000, "test": 10_000}
# Class names as the official batches.meta.txt lists them; the archive's own file is what we use,
# this list only checks it.
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# --- Preprocessing: the seed's Normalize(mean=0.5, std=0.5) per channel on pixels scaled to [0, 1] -
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)

# --- Models as served: raw uint8 RGB pixels in NHWC, the layout of a decoded image file --------------
SERVING_INPUT = "images"  # uint8 [batch, 32, 32, 3]
SERVING_OUTPUT = "logits"  # float32 [batch, 10]: the networks' output; the pyfunc adds names and probabilities
MAX_REQUEST_IMAGES = 1024  # images per prediction request; more is refused (HTTP 400), never an OOM kill

# --- Artifacts and tags that steps use to hand results to each other ------------------------------
DATASET_DIR = "dataset"  # ingest run: dataset/{train,test}_{images,labels}.npy + dataset/meta.json
CHECKPOINT_PATH = "checkpoint/model.pt"  # train run: self-describing checkpoint of the final weights
EPOCH_CHECKPOINT_DIR = "checkpoints"  # train run: one resumable checkpoint per epoch (weights, optimizer, RNG)
EPOCH_CHECKPOINT = "epoch_{epoch:04d}.pt"
TEST_LOGITS_PATH = "test_logits.npy"  # evaluate run: the checkpoint's float32 logits of every test image, one view
TAG_STEP = "cifar10.step"  # every step run: which entry point made it; checked when its id is handed on
TAG_STEP_RUN = "cifar10.{step}_run_id"  # main run: the run of each step (made or reused)
TAG_SHA256 = "cifar10.sha256"  # ingest and train runs: sha256 of the dataset's arrays
TAG_SOURCE = "cifar10.source"  # ingest run: where the data came from (URL or path)
TAG_LAST_CHECKPOINT = "cifar10.last_checkpoint_epoch"
TAG_RESUMED_FROM = "cifar10.resumed_from"  # train run: '<run id> after epoch N' when it continued a killed run
TAG_RESUMED_BY = "cifar10.resumed_by"  # the killed train run: the run that continued it
TAG_CODE_COMMIT = "cifar10.code_commit"  # a step run main or tune ran: its git commit, set only when the
# checkout had no uncommitted changes before and after it ran (MLflow's own commit tag is set either way)
TAG_PROCESS = "cifar10.process"  # a step run: 'host:pid' of its process (heartbeat.this_process)
TAG_HEARTBEAT = "cifar10.heartbeat"  # a step run: when that process last beat (Unix seconds)
TAG_SOURCE_SHA256 = "cifar10.source_sha256"  # ingest run: sha256 of the archive (or folder) it read
TAG_HARDWARE = "cifar10.hardware"  # train run: the device it trained on and its features (hardware.describe)
TAG_DECISION = "cifar10.auto."  # train run: + precision / channels_last / warning: why auto chose what it chose
TAG_PARTIAL = "cifar10.partial_artifacts"  # a FAILED run: artifacts a failure left half-written (not deleted)
TAG_REUSED = "cifar10.reused"  # main run: the steps it took from earlier runs instead of running them
TAG_STUDY = "cifar10.tune.study"  # tune run, and the winner's train run: the study's name
TAG_STUDY_RUN = "cifar10.tune.study_run_id"  # the winner's train run: the study run its parameters came from
TAG_STUDY_TRIALS = "cifar10.tune.trials"  # the winner's train run: trials in the study
TAG_STUDY_BEST_TRIAL = "cifar10.tune.best_trial"  # the winner's train run: the trial whose parameters it has
TAG_STUDY_BEST = "cifar10.tune.best_val_accuracy"  # the winner's train run: that trial's held-out accuracy
TAG_TRIAL_PRUNED = "cifar10.tune.pruned"  # a pruned trial run: at which epoch and why
TAG_TRIAL_FAILED = "cifar10.tune.failed"  # a failed trial run: why (e.g. its loss diverged)
PYTORCH_MODEL_NAME = "model"  # name= of the logged PyTorch flavor
ONNX_MODEL_NAME = "onnx_model"  # name= of the logged ONNX flavor
ONNX_INT8_MODEL_NAME = "onnx_int8_model"  # name= of the quantized ONNX model
TAG_PYTORCH_MODEL_URI = "cifar10.pytorch_model_uri"
TAG_ONNX_MODEL_URI = "cifar10.onnx_model_uri"
TAG_ONNX_PATH = "cifar10.onnx_path"  # export run: the ONNX file on disk (local stores)
TAG_REGISTERED = "cifar10.registered.{flavor}"  # export run: '<name>/<version>' or why it was not registered
TAG_PROMOTION = "cifar10.promotion"  # promote run: promoted | refused, with the reason and the version
TAG_PROMOTION_REASON = "cifar10.promotion_reason"
TAG_CANDIDATE_VERSION = "cifar10.candidate_version"
TAG_ENTRY_POINT = "mlflow.project.entryPoint"  # MLflow's own, on a run `mlflow run` made: its entry point
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own, on a nested run: the pipeline (main) run it belongs to
DEFAULT_MODEL_NAME = "cifar10-cnn"  # registered name of the PyTorch flavor; ONNX gets "-onnx"
ONNX_REGISTERED_SUFFIX = "-onnx"
INT8_REGISTERED_SUFFIX = "-int8"  # <model_name>-onnx-int8
CANDIDATE_ALIAS = "candidate"
INT8_CALIBRATION_IMAGES = 1000  # training images that set the INT8 activation ranges
INT8_MAX_DROP_POINTS = 1.0  # the INT8 model is registered only if it loses at most this much test accuracy

# ONNX Runtime vs PyTorch on the same float32 inputs: logits agree far tighter than this; a larger
# gap means the exported graph computes something else. Relative to the largest logit when that is
# above 1 (float32 keeps ~7 digits, so logits in the hundreds differ in absolute terms by more).
ONNX_MAX_ABS_DIFF = 1e-3

# --- Where ingest caches downloads (relative to the working directory unless absolute) ---------------
CACHE_DIR_ENV = "CIFAR10_DATA_DIR"
DEFAULT_CACHE_DIR = "data"

# `mlflow ui` opens an experiment by this tag's kind; without it MLflow 3 shows a GenAI traces overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
