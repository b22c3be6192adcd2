output "node_toml" {
  description = "/etc/ringpost/node.toml for every node of the group."
  value       = local.node_toml
  precondition {
    condition     = length(local.node_extra_collisions) == 0
    error_message = "node_extra repeats keys this module sets: ${join(", ", local.node_extra_collisions)}."
  }
  precondition {
    condition     = var.ports.media == 0 || var.media_public_url != ""
    error_message = "a media listener behind the load balancer needs media_public_url (else grants point at the node's private address)."
  }
  precondition {
    condition     = var.ws_driver == "tokio" || var.ports.ws > 0
    error_message = "ws_driver = \"uring\" drives the plain ws listener only: it needs ports.ws."
  }
}

output "coordinator_tomls" {
  description = "/etc/ringpost/coord.toml per replica, in replica order."
  value       = local.coordinator_tomls
}

output "tls_files" {
  description = "The certificate and key paths node.toml names (empty strings without wss and QUIC)."
  value = {
    cert = local.tls ? "${var.config_dir}/tls/fullchain.pem" : ""
    key  = local.tls ? "${var.config_dir}/tls/privkey.pem" : ""
  }
}

output "cluster_secret_file" {
  description = "Where node.toml and coord.toml expect the cluster secret."
  value       = "${var.config_dir}/cluster-secret"
}
