"""Text shipped with offload: what `offload train` learns from by default."""
