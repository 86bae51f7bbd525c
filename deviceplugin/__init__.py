"""Kubelet device plugins (deviceplugin/v1beta1): servers, registration, vendor backend API."""
