"""The ComfyUI backend: an HTTP + WebSocket client (:mod:`.client`), its binary frames
(:mod:`.frames`), what its answers mean (:mod:`.exceptions`), the backend plug-in
(:mod:`.backend`) and a process supervisor (:mod:`.supervisor`)."""
