"""transformers' text-encoder config conventions, and FLUX.1's two text encoders as data.

Shared by `pqjax.models.clip` and `pqjax.models.t5`:
- `ACTIVATIONS`: transformers' `ACT2FN` names -> JAX functions (the subset these encoders use).
- `GENERIC_FIELDS`: fields every transformers `PretrainedConfig` may write to config.json
  (generation defaults, labels, bookkeeping); none of them changes an encoder's forward pass.
- `parse_config`: strict config.json -> frozen dataclass, naming the file in every error.

`FLUX_CLIP_L_CONFIG` / `FLUX_T5_XXL_CONFIG` are the `config.json` contents of FLUX.1-dev's
`text_encoder/` (CLIP ViT-L/14 text tower, 123M params) and `text_encoder_2/` (T5 v1.1 XXL
encoder, 4.76B params), as published (FLUX.1-schnell ships the same two). Parse them with
`clip.read_config` / `t5.read_config`, e.g. to build an abstract full-size model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from pqjax.models.configs import ConfigError, check_types

C = TypeVar("C")


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers ACT2FN name -> function. "gelu" is the exact erf form; "gelu_new",
# "gelu_pytorch_tanh" and "gelu_fast" are all the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The JAX function for a transformers activation name (config already validated)."""
    return ACTIVATIONS[name]


def check_activation(name: Any, field: str, source: str) -> None:
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: {field} = {name!r} is not supported; supported: {sorted(ACTIVATIONS)}"
        )


# Fields any transformers PretrainedConfig may serialize that do not affect an encoder's forward
# pass: bookkeeping, generation defaults, task heads, training-only knobs, output switches.
GENERIC_FIELDS: tuple[str, ...] = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "name_or_path", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "gradient_checkpointing", "finetuning_task", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "sep_token_id",
    "decoder_start_token_id", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "output_past", "use_cache", "initializer_range",
    "initializer_factor", "dropout", "attention_dropout", "dropout_rate", "classifier_dropout",
)


def parse_config(
    cls: type[C], raw: dict[str, Any], source: str, ignore: tuple[str, ...]
) -> C:
    """Frozen dataclass `cls` from a transformers config dict.

    Keys starting with `_` and those in `ignore` are skipped; any other key that is not a field
    of `cls` is an error (it may change the architecture). `source` names the file.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_") or key in ignore:
            continue
        if key not in names:
            raise ConfigError(
                f"{source}: unsupported config field {key!r} = {value!r} for {cls.__name__}; "
                f"supported: {sorted(names)}; known and ignored: {sorted(ignore)}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    check_types(cls, kwargs, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid config for {cls.__name__}: {e}") from e


# FLUX.1-dev text_encoder/config.json (transformers 4.43.3). eos_token_id 2 is the pre-#24773
# CLIP value: pooling then takes the position of the largest token id (the EOS, 49407).
FLUX_CLIP_L_CONFIG: dict[str, Any] = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "vocab_size": 49408,
}

# FLUX.1-dev text_encoder_2/config.json (T5 v1.1 XXL; transformers 4.43.3).
FLUX_T5_XXL_CONFIG: dict[str, Any] = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "vocab_size": 32128,
}

# FluxPipeline's T5 sequence length per model (`max_sequence_length`); CLIP always uses 77.
MAX_SEQUENCE_LENGTH: dict[str, int] = {"flux-dev": 512, "flux-schnell": 256}
