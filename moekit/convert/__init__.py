"""Dense -> MoE conversion: sparse upcycling (`upcycle`), MoEfication splitting (`split`), Hugging Face dense
decoders in (`hf_dense`), composition of several dense models (`btx`, `prompts`, `nexus`), and `convert_run`,
what `moekit convert` does. See docs/convert.md."""

from moekit.convert.btx import BTXConfig, btx
from moekit.convert.cluster import balanced_kmeans
from moekit.convert.hf_dense import from_hf_dense, lm_config_from_hf, load_hf_dense
from moekit.convert.nexus import NexusConfig, add_expert, domain_embedding, nexus
from moekit.convert.prompts import PromptsConfig, prompts_moe
from moekit.convert.source import DenseSource, check_dense, load_dense
from moekit.convert.split import SplitConfig, SplitReport, split, split_ffn
from moekit.convert.upcycle import UpcycleConfig, upcycle

__all__ = [
    "BTXConfig", "NexusConfig", "PromptsConfig", "add_expert", "btx", "domain_embedding", "nexus", "prompts_moe",
    "DenseSource", "SplitConfig", "SplitReport", "UpcycleConfig", "balanced_kmeans", "check_dense", "from_hf_dense",
    "lm_config_from_hf", "load_dense", "load_hf_dense", "split", "split_ffn", "upcycle",
]
