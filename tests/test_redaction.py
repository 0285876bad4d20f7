"""Redaction, both ways: every secret in the table is masked, and none of the real trainers'
ordinary flags is (a recorded command must stay rerunnable). Plus properties: idempotent,
never raises, and the structlog processor reaches nested log fields.
"""

from __future__ import annotations

import io
import json

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasup.supervisor import logs, redact
from lorasup.supervisor.redact import (
    REDACTED,
    is_secret_name,
    redact_argv,
    redact_text,
    redact_value,
)
from tests.support import KOHYA_RECORDINGS, ROOT

# Flags of kohya sd-scripts, diffusers examples, transformers/TRL/peft and accelerate whose
# values are not secrets; many hold a secret word inside a longer name.
PLAIN_FLAGS = [
    # kohya sd-scripts
    "--tokenizer_cache_dir", "--max_token_length", "--keep_tokens", "--keep_tokens_separator",
    "--token_warmup_min", "--token_warmup_step", "--t5xxl_max_token_length",
    "--clip_l_max_token_length", "--caption_extension", "--caption_separator",
    "--secondary_separator", "--enable_wildcard", "--weighted_captions", "--network_module",
    "--network_dim", "--network_alpha", "--network_weights", "--network_args",
    "--dim_from_weights", "--scale_weight_norms", "--base_weights", "--sample_prompts",
    "--text_encoder_lr", "--unet_lr", "--learning_rate", "--lr_scheduler", "--optimizer_type",
    "--optimizer_args", "--max_train_steps", "--max_train_epochs", "--save_every_n_steps",
    "--save_model_as", "--output_name", "--output_dir", "--logging_dir", "--log_with",
    "--log_prefix", "--log_tracker_name", "--log_tracker_config", "--wandb_run_name",
    "--huggingface_repo_id", "--huggingface_repo_type", "--huggingface_path_in_repo",
    "--huggingface_repo_visibility", "--save_state_to_huggingface", "--resume_from_huggingface",
    "--async_upload", "--pretrained_model_name_or_path", "--train_data_dir", "--resolution",
    "--train_batch_size", "--mixed_precision", "--seed", "--max_data_loader_n_workers",
    "--cache_latents", "--cache_text_encoder_outputs", "--console_log_simple", "--masked_loss",
    "--alpha_mask", "--apply_t5_attn_mask",
    # diffusers examples
    "--placeholder_token", "--initializer_token", "--tokenizer_name", "--hub_model_id",
    "--push_to_hub", "--validation_prompt", "--num_validation_images",
    "--checkpoints_total_limit", "--resume_from_checkpoint", "--checkpointing_steps",
    "--enable_xformers_memory_efficient_attention", "--noise_offset", "--prediction_type",
    "--snr_gamma", "--use_8bit_adam", "--adam_beta1", "--report_to", "--lr_warmup_steps",
    "--max_grad_norm", "--lr", "--instance_prompt", "--class_prompt", "--caption_column",
    "--image_column",
    # transformers / TRL / peft
    "--max_steps", "--save_steps", "--save_state", "--logging_steps", "--eval_strategy",
    "--include_tokens_per_second", "--include_num_input_tokens_seen",
    "--average_tokens_across_devices", "--max_seq_length", "--pad_to_max_length",
    "--use_fast_tokenizer", "--keep_linebreaks", "--hub_private_repo", "--hub_strategy",
    "--dataset_text_field", "--max_new_tokens", "--eos_token", "--pad_token", "--bos_token",
    "--lora_r", "--lora_alpha", "--target_modules", "--optim", "--log_level", "--no_nan_filter",
    "--auth_type", "--token_file", "--password_file", "--session_name", "--key_frames",
    "--caption_key", "--image_key", "--sort_key", "--dataset_key",
    # accelerate
    "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
    "--main_process_port", "--dynamo_backend", "--num_cpu_threads_per_process",
    "--config_file", "--gpu_ids", "--deepspeed_config_file", "--fsdp_state_dict_type",
]

SECRET_FLAGS = [
    "--token", "--hf_token", "--hub_token", "--huggingface_token", "--push_to_hub_token",
    "--use_auth_token", "--auth_token", "--access_token", "--wandb_key", "--wandb_api_key",
    "--api_key", "--api-key", "--apikey", "--key", "--secret", "--client_secret",
    "--secret_key", "--access_key", "--private_key", "--aws_secret_access_key", "--password",
    "--db-password", "--passwd", "--pwd", "--passphrase", "--auth", "--http_auth",
    "--credentials", "--cookie", "--session", "--hfToken", "--apiKey", "--openai.api_key",
]

SECRET_ENV = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY",
              "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "PGPASSWORD", "MYSQL_PWD", "COMET_API_KEY"]
PLAIN_ENV = ["PYTHONPATH", "CUDA_VISIBLE_DEVICES", "COLUMNS", "HF_HOME", "TOKENIZERS_PARALLELISM",
             "WANDB_PROJECT", "OMP_NUM_THREADS", "HF_HUB_OFFLINE"]

VALUE = "s3cr3t-Value_42"


def recorded_flags() -> set[str]:
    flags: set[str] = set()
    for path in (ROOT / "tests" / "data").glob("*/*.jsonl"):
        with path.open(encoding="utf-8") as fh:
            meta = json.loads(fh.readline())
        flags.update(a.split("=", 1)[0] for a in meta.get("argv", []) if a.startswith("--"))
    return flags


def test_the_table_holds_every_flag_of_the_recordings() -> None:
    assert KOHYA_RECORDINGS.is_dir()
    missing = recorded_flags() - set(PLAIN_FLAGS)
    assert not missing, f"add these recorded flags to PLAIN_FLAGS: {sorted(missing)}"


@pytest.mark.parametrize("flag", PLAIN_FLAGS)
def test_ordinary_flags_stay_readable(flag: str) -> None:
    assert not is_secret_name(flag)
    assert redact_argv([flag + "=12"]) == [flag + "=12"]
    assert redact_argv([flag, "value_1", "--x"]) == [flag, "value_1", "--x"]
    assert redact_text(f"cmd {flag}=12 {flag} 7") == f"cmd {flag}=12 {flag} 7"


@pytest.mark.parametrize("flag", SECRET_FLAGS)
def test_secret_flags_are_masked_in_every_form(flag: str) -> None:
    assert is_secret_name(flag)
    assert redact_argv(["train.py", f"{flag}={VALUE}", "--seed=1"]) == [
        "train.py", f"{flag}={REDACTED}", "--seed=1"]
    assert redact_argv(["train.py", flag, VALUE, "--seed", "1"]) == [
        "train.py", flag, REDACTED, "--seed", "1"]
    assert VALUE not in redact_text(f"error: bad {flag}={VALUE} given")
    assert VALUE not in redact_text(f"cmd {flag} {VALUE} --seed 1")


def test_a_boolean_secret_flag_does_not_hide_the_next_flag() -> None:
    argv = ["train.py", "--use_auth_token", "--output_dir", "out"]
    assert redact_argv(argv) == argv


@pytest.mark.parametrize("name", SECRET_ENV)
def test_secret_environment_items(name: str) -> None:
    assert redact_argv(["env", f"{name}={VALUE}", "python"]) == ["env", f"{name}={REDACTED}",
                                                               "python"]
    assert redact_value({name: VALUE}) == {name: REDACTED}


@pytest.mark.parametrize("name", PLAIN_ENV)
def test_plain_environment_items(name: str) -> None:
    assert redact_argv([f"{name}=0,1"]) == [f"{name}=0,1"]
    assert redact_value({name: "0,1"}) == {name: "0,1"}


# text: (what must be gone, what must stay)
TEXT_CASES = [
    ("clone https://alice:PA55word@example.com/repo.git", "PA55word", "https://alice:***@"),
    ("git+ssh://bob:hunter2@host:22/x", "hunter2", "bob:***@host"),
    ("Authorization: Bearer abcDEF123.x-y", "abcDEF123.x-y", "Authorization: Bearer ***"),
    ("-H 'Authorization: token 0123abcd'", "0123abcd", "Authorization: token ***"),
    ("Proxy-Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Basic ***"),
    ("authorization=Zm9vYmFy", "Zm9vYmFy", "authorization=***"),
    ("sent Bearer eyJhbGciOiJI.eyJzdWIiOiIx.c2lnbmF0dXJl", "eyJzdWIiOiIx", "Bearer ***"),
    ("token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "hf_AbCd", "token ***"),
    ("key sk-proj-abcdefghijklmnop1234", "sk-proj", "key ***"),
    ("pushed with ghp_abcdefghijklmnopqrstuvwxyz0123", "ghp_", "pushed with ***"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghij", "github_pat_", "pat ***"),
    ("slack xoxb-1234567890-abcdefghij", "xoxb-", "slack ***"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "aws *** here"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.abcdefghijk", "eyJ", "jwt ***"),
    ('{"hf_token": "abc def", "seed": 1}', "abc def", '"seed": 1'),
    ("wandb_api_key: 0123456789abcdef", "0123456789abcdef", "wandb_api_key: ***"),
    ("OSError: bad --hub_token xyz987 given", "xyz987", "--hub_token ***"),
    # a short (old-style or test) Hugging Face token, outside any name=value pair
    ("login failed for hf_abc123XYZ: 401", "hf_abc123XYZ", "login failed for ***: 401"),
    ("using hf_TestToken", "hf_TestToken", "using ***"),
    # a secret pair after an earlier, harmless ``word: `` on the same line
    ("env: WANDB_API_KEY=" + "0123456789abcdef" * 2 + "01234567 ok", "0123456789abcdef",
     "env: WANDB_API_KEY=*** ok"),
    ("config: note=x HF_TOKEN=abcdef012345 seed=3", "abcdef012345", "HF_TOKEN=*** seed=3"),
    ("a: b: c: password=hunter22", "hunter22", "a: b: c: password=***"),
]

PLAIN_TEXT = [
    "steps:  50%|#####     | 6/12 [00:01<00:01,  1.50s/it, avr_loss=0.123]",
    "{'loss': '6.224', 'grad_norm': '1.035', 'learning_rate': '0.001', 'epoch': '0.03125'}",
    "saving checkpoint: out/normal/test_lora.safetensors",
    "INFO     load tokenizer from cache: tokenizer_cache/openai_clip-vit-large-patch14",
    "max_token_length: 225, keep_tokens=2, --keep_tokens 3",
    "the bearer of bad news, bearer information",
    "KeyError: 'text'",
    "https://huggingface.co/datasets/x and http://localhost:8080/path",
    "commit 0123456789abcdef0123456789abcdef01234567",
    "task-manager risk-averse sk-short",
    "placeholder_token=<cat-toy> eos_token: </s>",
    "export HF_HUB_ENABLE_HF_TRANSFER=1 (hf_transfer), hf_hub_download(repo_id=x)",
    "note: the step: 3 loss: 0.25 lr: 1e-4",
]


@pytest.mark.parametrize(("text", "gone", "kept"), TEXT_CASES)
def test_secrets_in_text_are_masked(text: str, gone: str, kept: str) -> None:
    redacted = redact_text(text)
    assert gone not in redacted
    assert kept in redacted


@pytest.mark.parametrize("text", PLAIN_TEXT)
def test_ordinary_trainer_text_is_untouched(text: str) -> None:
    assert redact_text(text) == text


def test_recorded_commands_survive_redaction_unchanged() -> None:
    for path in (ROOT / "tests" / "data").glob("*/*.jsonl"):
        with path.open(encoding="utf-8") as fh:
            argv = json.loads(fh.readline())["argv"]
        assert redact_argv(argv) == argv, path.name


def test_log_fields_are_redacted_through_nesting() -> None:
    stream = io.StringIO()
    logs.configure("json", stream)
    try:
        structlog.get_logger().info(
            "started", argv=["train.py", "--hf_token", "abc123", "--keep_tokens", "3"],
            env={"WANDB_API_KEY": "k-123", "COLUMNS": "200"},
            nested=[{"url": "https://u:pw9@h"}, ("Bearer abcdef123456",)],
            api_key="abc", line="--pwd=xyz")
    finally:
        structlog.reset_defaults()
    record = json.loads(stream.getvalue())
    assert record["argv"] == ["train.py", "--hf_token", REDACTED, "--keep_tokens", "3"]
    assert record["env"] == {"WANDB_API_KEY": REDACTED, "COLUMNS": "200"}
    assert record["nested"] == [{"url": "https://u:***@h"}, [f"Bearer {REDACTED}"]]
    assert record["api_key"] == REDACTED
    assert record["line"] == f"--pwd={REDACTED}"
    for secret in ("abc123", "k-123", "pw9", "abcdef123456", "xyz"):
        assert secret not in stream.getvalue()


# ----------------------------------------------------------------------------- properties

PIECES = st.sampled_from([
    "--hf_token", "--hf_token=", "token: ", "Authorization: Bearer ", "Bearer ", "https://",
    "u:p@", "@", ":", "=", " ", "-", "--", '"', "'", "***", "hf_", "sk-", "eyJ", ".", "key",
    "password=", "--keep_tokens", "AKIA", "x" * 20, "0123456789", "\n", "\r", ",", "{", "}",
])
TEXTS = st.one_of(st.text(max_size=300), st.lists(PIECES, max_size=30).map("".join),
                  st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=30).map("".join))


@given(TEXTS)
@settings(max_examples=400, deadline=None)
def test_redact_text_is_idempotent_and_total(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


@given(st.lists(TEXTS, max_size=12))
@settings(max_examples=200, deadline=None)
def test_redact_argv_is_idempotent_and_keeps_length(argv: list[str]) -> None:
    once = redact_argv(argv)
    assert len(once) == len(argv)
    assert redact_argv(once) == once


@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXTS),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(TEXTS, inner, max_size=4)),
                    max_leaves=20), TEXTS)
@settings(max_examples=200, deadline=None)
def test_redact_value_never_raises_and_is_idempotent(value: object, key: str) -> None:
    once = redact_value(value, key)
    assert redact_value(once, key) == once or once != once  # NaN is never equal to itself


# ------------------------------------------------------------------- values seen as secrets


@pytest.fixture
def remembered():
    redact.forget_all()
    yield redact
    redact.forget_all()


def test_a_value_seen_under_a_secret_name_is_masked_wherever_it_appears(remembered) -> None:
    remembered.remember(["train.py", "--hf_token", "tok-777-abc", "--api_key=plainvalue9",
                         "--keep_tokens", "300000"],
                        {"WANDB_API_KEY": "wandbsecret", "HOME": "/home/alice",
                         "MY_PASSWORD": "pw"})
    line = "ready: tok-777-abc / plainvalue9 / wandbsecret in /home/alice keep 300000"
    assert redact_text(line) == "ready: *** / *** / *** in /home/alice keep 300000"
    # too short to be masked alone (it still is next to its name)
    assert redact_text("pw is 2 letters") == "pw is 2 letters"
    assert redact_text("MY_PASSWORD=pw") == "MY_PASSWORD=***"


def test_working_directories_and_paths_are_not_remembered(remembered) -> None:
    """``PWD`` ends in a secret word (``--pwd``) but is the shell's working directory: it
    must not mask the run's paths in every line (found in a newcomer's first run)."""
    remembered.remember(["--db_password", "/etc/secret-file"],
                        {"PWD": "/tmp/newbie", "OLDPWD": "/home/alice/project",
                         "DESKTOP_SESSION": "ubuntu-wayland", "MY_TOKEN": "tok-123456"})
    line = "report: /tmp/newbie/training_logs/x, from /home/alice/project on ubuntu-wayland"
    assert redact_text(line) == line
    assert redact_text("with tok-123456") == "with ***"


def test_remembered_values_are_bounded_and_idempotent(remembered) -> None:
    remembered.remember(environ={f"X{i}_TOKEN": f"value-number-{i:04d}" for i in range(500)})
    assert len(redact._known.values) == redact.MAX_REMEMBERED
    text = "x value-number-0001 y"
    once = redact_text(text)
    assert redact_text(once) == once


@given(st.lists(st.text(min_size=1, max_size=12), max_size=5), TEXTS)
@settings(max_examples=150, deadline=None)
def test_masking_remembered_values_is_total_and_idempotent(values: list[str], text: str) -> None:
    redact.forget_all()
    try:
        redact.remember(environ={f"X{i}_SECRET": v for i, v in enumerate(values)})
        once = redact_text(text + "".join(values))
        assert redact_text(once) == once
        for v in values:
            if redact._rememberable(v.strip()):
                assert v.strip() not in once
    finally:
        redact.forget_all()
