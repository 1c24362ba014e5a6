"""The μBench service cell shared by every stack (see ARCHITECTURE.md, "μBench cell")."""
