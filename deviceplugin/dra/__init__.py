"""Dynamic Resource Allocation: a device backend served to the kubelet as a DRA driver.

The same backend a device plugin uses, through another kubelet API: the DRAPlugin gRPC
service (v1 and v1beta1) on <kubeletDir>/plugins/<driver>/dra.sock, registered through
the plugin watcher, and the node's devices published as resource.k8s.io/v1
ResourceSlices. The Kubernetes API client is imported only when a resource uses DRA.
"""
