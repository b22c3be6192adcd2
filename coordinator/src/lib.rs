//! Ringpost coordinator: the Raft-replicated membership service (members, ring epoch, replica
//! sets). Nodes talk to it only through its client API. This build carries the binary's
//! command-line surface; the replicated service arrives with the cluster work.
