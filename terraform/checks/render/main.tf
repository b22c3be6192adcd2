# Renders what the EC2 deployment writes on its hosts, from example inputs, for
# scripts/deploy-check.sh: it applies this root (no provider, no resource: outputs only) and
# hands node.toml and coord.toml to the real binaries' `--check-config`, the nft file to
# `nft -c`, the node's drop-in to `systemd-analyze verify`, and the instance-env script to a
# fake metadata service. The same modules, wired the same way as terraform/main.tf.

terraform {
  required_version = ">= 1.9.0"
}

module "topology" {
  source            = "../../modules/topology"
  name              = "rp-check"
  coordinator_count = 3
  coordinator_subnets = [
    { id = "subnet-a", cidr = "10.0.1.0/24", az = "eu-west-1a" },
    { id = "subnet-b", cidr = "10.0.2.0/24", az = "eu-west-1b" },
    { id = "subnet-c", cidr = "10.0.3.0/24", az = "eu-west-1c" },
  ]
  node_subnets = [
    { id = "subnet-pa", cidr = "10.0.101.0/24", az = "eu-west-1a" },
    { id = "subnet-pb", cidr = "10.0.102.0/24", az = "eu-west-1b" },
  ]
  admin_cidrs = ["10.0.200.0/24"]
  ports       = { ws = 80, wss = 443, quic = 443, media = 7781 }
}

module "config" {
  source           = "../../modules/config"
  ports            = module.topology.ports
  coordinators     = module.topology.coordinators
  shard_count      = 4096
  sms_gateway_url  = "https://sms.internal.example/v1/send"
  media_public_url = "https://media.chat.example:8443"
  media_s3_bucket  = "rp-check-media-123456789012"
  media_s3_region  = "eu-west-1"
  ws_driver        = "uring" # so that --check-config and systemd-analyze see it and its drop-in
}

module "node_user_data" {
  source        = "../../modules/user_data"
  role          = "node"
  binary_url    = "https://releases.chat.example/ringpost/1.0.0/ringpost-node"
  binary_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  config_toml   = module.config.node_toml
  region        = "eu-west-1"
  ports         = module.topology.ports
  file_secrets = {
    (module.config.cluster_secret_file) = "/rp-check/cluster-secret"
    (module.config.tls_files.cert)      = "/rp-check/tls/fullchain"
    (module.config.tls_files.key)       = "/rp-check/tls/privkey"
  }
  env_secrets    = { RINGPOST_SMS_GATEWAY_TOKEN = "/rp-check/sms-gateway-token" }
  advertise_host = "n-{public_ipv4_dashed}.nodes.chat.example"
  allow_io_uring = true
}

module "coordinator_user_data" {
  source         = "../../modules/user_data"
  role           = "coordinator"
  binary_url     = "https://releases.chat.example/ringpost/1.0.0/ringpost-coordinator"
  binary_sha256  = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  config_toml    = module.config.coordinator_tomls[0]
  region         = "eu-west-1"
  file_secrets   = { (module.config.cluster_secret_file) = "/rp-check/cluster-secret" }
  data_volume_id = "vol-0123456789abcdef0"
}

output "node_toml" {
  value = module.config.node_toml
}

output "coord_toml" {
  value = module.config.coordinator_tomls[0]
}

output "node_files" {
  value = module.node_user_data.files
}

output "coordinator_files" {
  value = module.coordinator_user_data.files
}

output "node_cloud_config" {
  value = module.node_user_data.cloud_config
}

output "coordinator_cloud_config" {
  value = module.coordinator_user_data.cloud_config
}

output "node_user_data_bytes" {
  value = length(module.node_user_data.user_data_base64)
}
