# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Content captions from a vision-language model, for restoration prompts (SUPIR prompts its restorer with a
caption of the degraded image's content, so that the prior knows *what* to restore).

`ImageCaptioner` wraps any transformers image-text-to-text model (`AutoProcessor` + `AutoModelForImageTextToText`:
LLaVA, Qwen2-VL, PaliGemma, SmolVLM, ...; transformers 5 removed `AutoModelForVision2Seq` and the `image-to-text`
pipeline). It captions in batches, greedily (deterministic), and remembers captions by image content, so an image
is captioned once per model and instruction, also across runs when given a cache file. `combine_prompt` makes the
restoration prompt "<content caption>. <degradation prompt>".

At inference, two lines::

    captioner = ImageCaptioner("llava-hf/llava-interleave-qwen-0.5b-hf")
    restored = pipe(image, prompt=combine_prompt(captioner.caption([image])[0], "Remove the noise")).images[0]

(the pipeline's prompt cache then serves repeated calls on the same image).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from PIL import Image

__all__ = ["DEFAULT_CAPTION_INSTRUCTION", "DEFAULT_PROMPT_TEMPLATE", "ImageCaptioner", "combine_prompt"]

DEFAULT_CAPTION_INSTRUCTION = "Describe the content of this photo in one short sentence."
DEFAULT_PROMPT_TEMPLATE = "{caption}. {prompt}"


def combine_prompt(caption: str, prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The restoration prompt from a content caption and a degradation prompt, by `template` (`{caption}` and
    `{prompt}` placeholders). Trailing full stops and spaces of the caption are dropped first, so that the default
    template gives "A cat on a sofa. Remove the noise" and an empty caption gives the prompt alone."""
    if "{caption}" not in template:
        raise ValueError(f"The prompt template must contain {{caption}}, got {template!r}.")
    caption = " ".join(caption.split()).rstrip(". ")
    if not caption:
        return prompt
    try:
        return template.format(caption=caption, prompt=prompt).strip()
    except (KeyError, IndexError) as error:
        raise ValueError(f"The prompt template may only use {{caption}} and {{prompt}}, got {template!r}.") from error


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size: the same picture gives the same digest whatever its file format."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()


class ImageCaptioner:
    """Batched, cached captions from a transformers image-text-to-text model.

    Args:
        model: a Hub repo id or local folder loadable with `AutoProcessor` and `AutoModelForImageTextToText`
            (weights from safetensors only).
        instruction: what the model is asked; the default asks for one short sentence about the content.
        max_new_tokens: length limit of a caption.
        batch_size: images per `generate` call.
        device, torch_dtype: where and in what precision the model runs (default CPU, the checkpoint's dtype).
        cache_file: a JSON-lines file of captions by image digest; read at start, appended after every batch, so an
            interrupted run resumes without captioning anything twice.
        revision: the model revision.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        instruction: str = DEFAULT_CAPTION_INSTRUCTION,
        max_new_tokens: int = 40,
        batch_size: int = 8,
        device: str | None = None,
        torch_dtype: Any = None,
        cache_file: str | os.PathLike | None = None,
        revision: str | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
        self.model_name = os.fspath(model)
        self.instruction, self.max_new_tokens, self.batch_size = instruction, max_new_tokens, batch_size
        self.processor = AutoProcessor.from_pretrained(self.model_name, revision=revision)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_name, revision=revision, use_safetensors=True, dtype=torch_dtype
        ).eval()
        if device is not None:
            self.model.to(device)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation continues every row from its last token
        self._key_prefix = json.dumps([self.model_name, revision, instruction, max_new_tokens])
        self.cache: dict[str, str] = {}
        self.cache_file = os.fspath(cache_file) if cache_file is not None else None
        if self.cache_file is not None and os.path.isfile(self.cache_file):
            with open(self.cache_file, encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        self.cache[entry["key"]] = entry["caption"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        if line.endswith("\n"):  # a torn last line is what an interrupted run leaves: ignored
                            raise ValueError(f"{self.cache_file}, line {line_number}: not a caption cache entry.")

    def _key(self, image: Image.Image) -> str:
        return hashlib.sha256((self._key_prefix + image_digest(image)).encode()).hexdigest()

    def _prompt(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.instruction

    def _generate(self, images: list[Image.Image]) -> list[str]:
        import torch

        prompt = self._prompt()
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [" ".join(text.split()) for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def caption(self, images: Iterable[Image.Image]) -> list[str]:
        """One caption per image (RGB-converted), from the cache when this model and instruction saw it before."""
        images = [image.convert("RGB") for image in images]
        keys = [self._key(image) for image in images]
        todo = [index for index, key in enumerate(keys) if key not in self.cache]
        unique = list(dict.fromkeys(keys[index] for index in todo))
        first = {key: next(i for i in todo if keys[i] == key) for key in unique}
        for start in range(0, len(unique), self.batch_size):
            batch_keys = unique[start : start + self.batch_size]
            captions = self._generate([images[first[key]] for key in batch_keys])
            self.cache.update(zip(batch_keys, captions))
            if self.cache_file is not None:
                with open(self.cache_file, "a", encoding="utf-8") as handle:
                    for key, caption in zip(batch_keys, captions):
                        handle.write(json.dumps({"key": key, "caption": caption}) + "\n")
        return [self.cache[key] for key in keys]
