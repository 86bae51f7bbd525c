"""The nodeplug daemon: config, supervision and composition of the three kubelet plugins."""
