"""Data: the built-in multi-domain corpus, your own files, the split, the BPE tokenizer and tokenised datasets.

The one call training needs:

    from moekit.data import prepare_data
    data = prepare_data("builtin", vocab_size=8192)          # or prepare_data(["my.jsonl"], label_field="domain")
    x, y, labels = data.train.sample_batch(8, 256, generator) # LongTensors [8, 256], [8, 256], [8]
    windows = data.val.val_windows(256, max_windows_per_label=64)  # {"bible": [N, 257], "code": ..., "wiki": ...}
"""

from moekit.data.cache import cache_root
from moekit.data.corpus import ALL_DOMAINS, BUILTIN_DOMAINS, builtin_corpus
from moekit.data.dataset import TokenDataset
from moekit.data.document import Document
from moekit.data.files import load_documents
from moekit.data.prepare import DataConfig, PreparedData, prepare_data
from moekit.data.reference import reference_data_config
from moekit.data.sources import load_bible, load_code, load_docs, load_libcode, load_wiki
from moekit.data.split import split_documents
from moekit.data.tokenizer import EOS_TOKEN, BPETokenizer, TokenizerConfig

__all__ = [
    "ALL_DOMAINS",
    "BPETokenizer",
    "BUILTIN_DOMAINS",
    "DataConfig",
    "Document",
    "EOS_TOKEN",
    "PreparedData",
    "TokenDataset",
    "TokenizerConfig",
    "builtin_corpus",
    "cache_root",
    "load_bible",
    "load_code",
    "load_docs",
    "load_documents",
    "load_libcode",
    "load_wiki",
    "prepare_data",
    "reference_data_config",
    "split_documents",
]
