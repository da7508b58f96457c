"""Run-time attention sparsity (Double Sparsity): label channels, a label cache and top-k token sparse decode."""
from ptq.sparse.double_sparsity import (DSConfig, ChannelStats, double_sparse_attention, double_sparse_attention_study,
                                        install, install_from, load_double_sparsity, load_labels, make_cache,
                                        random_labels, uninstall)
from ptq.sparse.ds_runtime import DSCache, sparse_decode

__all__ = ["DSConfig", "ChannelStats", "DSCache", "double_sparse_attention", "double_sparse_attention_study",
           "install", "install_from", "load_double_sparsity", "load_labels", "make_cache", "random_labels",
           "sparse_decode", "uninstall"]
