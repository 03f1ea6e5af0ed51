"""Prompt -> token ids, as `ZImagePipeline._encode_prompt` makes them.

The pipeline renders the chat template for one user turn with the generation prompt and
`enable_thinking=True`, which for Qwen3's template is exactly
`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, then tokenizes it (no special
tokens added: Qwen's tokenizer has no BOS), pads right to `max_sequence_length` (512) and
truncates. Only the real tokens are kept afterwards, so the padding never reaches the model
(see text_encoder.py); truncation is applied here the same way.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from ..errors import BadRequest, UnsupportedModel

MAX_SEQUENCE_LENGTH = 512
TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class PromptTokenizer:
    def __init__(self, tokenizer_json: bytes, max_length: int = MAX_SEQUENCE_LENGTH):
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise UnsupportedModel(f"tokenizer/tokenizer.json cannot be loaded: {e}") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length

    @staticmethod
    def format(prompt: str) -> str:
        return TEMPLATE.format(prompt=prompt)

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise BadRequest("the prompt must be text")
        ids = self.tokenizer.encode(self.format(prompt), add_special_tokens=True).ids
        return ids[: self.max_length]
