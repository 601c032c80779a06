//! The datapath: load the eBPF object, write plans into its maps. The only module that
//! touches aya.
