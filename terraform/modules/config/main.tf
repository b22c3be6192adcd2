# Provider-free: renders node.toml and one coord.toml per replica from variables. Values
# that differ per node and are known only at boot (node_id, zone, listen_admin, listen_peer,
# advertise_*) are not here: the user-data writes them to /etc/ringpost/node.env, whose
# RINGPOST_* variables the node reads over its file (deploy/ringpost-node.service).
# scripts/deploy-check.sh renders both files and parses them with the real binaries
# (`--check-config`).

terraform {
  required_version = ">= 1.9.0"
}

locals {
  p   = var.ports
  tls = local.p.wss > 0 || local.p.quic > 0

  # Each value is already TOML: strings through jsonencode (a JSON string is a TOML basic
  # string), numbers and booleans as they print.
  node_keys = merge(
    {
      data_dir            = jsonencode(var.data_dir)
      log_format          = jsonencode(var.log_format)
      coordinator         = jsonencode(join(",", [for c in var.coordinators : "${c.private_ip}:${local.p.coordinator_client}"]))
      cluster_secret_file = jsonencode("${var.config_dir}/cluster-secret")
      shard_count         = tostring(var.shard_count)
      replicate           = tostring(var.replicate)
      ws_driver           = jsonencode(var.ws_driver)
    },
    local.p.ws > 0 ? { listen_ws = jsonencode("0.0.0.0:${local.p.ws}") } : {},
    local.p.wss > 0 ? { listen_wss = jsonencode("0.0.0.0:${local.p.wss}") } : {},
    local.p.quic > 0 ? { listen_quic = jsonencode("0.0.0.0:${local.p.quic}") } : {},
    local.tls ? {
      tls_cert = jsonencode("${var.config_dir}/tls/fullchain.pem")
      tls_key  = jsonencode("${var.config_dir}/tls/privkey.pem")
    } : {},
    var.sms_gateway_url != "" ? { sms_gateway_url = jsonencode(var.sms_gateway_url) } : {},
    var.codes_to_log ? { codes_to_log = "true" } : {},
    local.p.media > 0 ? merge(
      { listen_media = jsonencode("0.0.0.0:${local.p.media}") },
      var.media_public_url != "" ? { media_public_url = jsonencode(var.media_public_url) } : {},
      var.media_s3_bucket != "" ? {
        media_store     = jsonencode("s3")
        media_s3_bucket = jsonencode(var.media_s3_bucket)
        media_s3_region = jsonencode(var.media_s3_region)
      } : {},
    ) : {},
  )
  node_extra_collisions = setintersection(keys(local.node_keys), keys(var.node_extra))
  node_all              = merge(local.node_keys, { for k, v in var.node_extra : k => jsonencode(v) })

  header = "# Rendered by terraform/modules/config; edit the Terraform variables, not this file.\n"
  node_toml = join("", [
    local.header,
    "# Per-host values (node_id, zone, listen_admin, listen_peer, advertise_*) come from RINGPOST_* variables: instance.env on EC2.\n",
    join("", [for k in sort(keys(local.node_all)) : "${k} = ${local.node_all[k]}\n"]),
  ])

  coordinator_tomls = [
    for c in var.coordinators : join("", [
      local.header,
      join("", [
        for k, v in merge(
          {
            replica_id    = tostring(c.replica_id)
            data_dir      = jsonencode(var.coordinator_data_dir)
            secret_file   = jsonencode("${var.config_dir}/cluster-secret")
            raft_listen   = jsonencode("${c.private_ip}:${local.p.raft}")
            client_listen = jsonencode("${c.private_ip}:${local.p.coordinator_client}")
            admin_listen  = jsonencode("${c.private_ip}:${local.p.coordinator_admin}")
            log_format    = jsonencode(var.log_format)
          },
          { for k, v in var.coordinator_extra : k => jsonencode(v) },
        ) : "${k} = ${v}\n"
      ]),
    ])
  ]
}
