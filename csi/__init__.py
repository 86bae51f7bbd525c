"""CSI driver (spec v1): Identity, Controller and Node services on local storage."""
