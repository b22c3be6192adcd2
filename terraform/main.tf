# Ringpost on EC2: 3 or 5 coordinators with EBS data volumes, one per availability zone;
# nodes in an auto-scaling group behind a network load balancer (TCP for ws and wss, UDP for
# QUIC), each node also reachable on its own public address for redirects; security groups,
# instance roles, an optional media bucket. docs/operations.md, "Deploying", walks through
# it. This root needs the AWS provider and cannot be initialised offline: scripts/
# deploy-check.sh checks it with `terraform fmt` and checkov (baseline: .checkov.yaml), and
# runs the provider-free modules' tests.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_subnet" "coordinator" {
  for_each = toset(var.coordinator_subnet_ids)
  id       = each.value
}

data "aws_subnet" "node" {
  for_each = toset(var.node_subnet_ids)
  id       = each.value
}

data "aws_ssm_parameter" "al2023" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-${var.architecture}"
}

locals {
  ami_id    = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.al2023[0].insecure_value
  partition = data.aws_partition.current.partition
  account   = data.aws_caller_identity.current.account_id

  tls                 = module.topology.ports.wss > 0 || module.topology.ports.quic > 0
  media_bucket_name   = "${module.topology.names.media_bucket_prefix}${local.account}"
  parameter_names     = compact([var.ssm_parameters.cluster_secret, var.ssm_parameters.tls_cert, var.ssm_parameters.tls_key, var.ssm_parameters.sms_gateway_token])
  parameter_arn       = { for n in local.parameter_names : n => "arn:${local.partition}:ssm:${var.region}:${local.account}:parameter/${trimprefix(n, "/")}" }
  coordinator_volumes = { for c in module.topology.coordinators : tostring(c.replica_id) => c }
}

module "topology" {
  source              = "./modules/topology"
  name                = var.name
  coordinator_count   = var.coordinator_count
  coordinator_subnets = [for id in var.coordinator_subnet_ids : { id = id, cidr = data.aws_subnet.coordinator[id].cidr_block, az = data.aws_subnet.coordinator[id].availability_zone }]
  node_subnets        = [for id in var.node_subnet_ids : { id = id, cidr = data.aws_subnet.node[id].cidr_block, az = data.aws_subnet.node[id].availability_zone }]
  node_count          = var.node_count
  replication_factor  = var.replication_factor
  shard_count         = var.shard_count
  ports               = var.ports
  client_cidrs        = var.client_cidrs
  admin_cidrs         = var.admin_cidrs
}

module "config" {
  source           = "./modules/config"
  ports            = module.topology.ports
  coordinators     = module.topology.coordinators
  shard_count      = var.shard_count
  sms_gateway_url  = var.sms_gateway_url
  codes_to_log     = var.codes_to_log
  media_public_url = var.media_public_url
  media_s3_bucket  = var.media_bucket ? local.media_bucket_name : ""
  media_s3_region  = var.region
  ws_driver        = var.ws_driver
}

module "node_user_data" {
  source        = "./modules/user_data"
  role          = "node"
  binary_url    = var.node_binary.url
  binary_sha256 = var.node_binary.sha256
  config_toml   = module.config.node_toml
  region        = var.region
  ports         = module.topology.ports
  file_secrets = merge(
    { (module.config.cluster_secret_file) = var.ssm_parameters.cluster_secret },
    local.tls ? {
      (module.config.tls_files.cert) = var.ssm_parameters.tls_cert
      (module.config.tls_files.key)  = var.ssm_parameters.tls_key
    } : {},
  )
  env_secrets    = var.ssm_parameters.sms_gateway_token != "" ? { RINGPOST_SMS_GATEWAY_TOKEN = var.ssm_parameters.sms_gateway_token } : {}
  advertise_host = var.advertise_host
  allow_io_uring = var.ws_driver == "uring"
}

module "coordinator_user_data" {
  source         = "./modules/user_data"
  for_each       = local.coordinator_volumes
  role           = "coordinator"
  binary_url     = var.coordinator_binary.url
  binary_sha256  = var.coordinator_binary.sha256
  config_toml    = module.config.coordinator_tomls[each.value.replica_id - 1]
  region         = var.region
  file_secrets   = { (module.config.cluster_secret_file) = var.ssm_parameters.cluster_secret }
  data_volume_id = aws_ebs_volume.coordinator[each.key].id
}
