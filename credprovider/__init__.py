"""The kubelet image credential provider (exec plugin); standard library only."""
