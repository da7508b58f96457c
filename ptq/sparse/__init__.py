"""Run-time attention sparsity (Double Sparsity): label channels and top-k token sparse attention."""
from ptq.sparse.double_sparsity import (DSConfig, ChannelStats, double_sparse_attention, install, install_from,
                                        load_labels, random_labels, uninstall)

__all__ = ["DSConfig", "ChannelStats", "double_sparse_attention", "install", "install_from", "load_labels",
           "random_labels", "uninstall"]
