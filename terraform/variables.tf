# The AWS deployment's inputs. Shape and validation (coordinator count, zones, ports, sizes)
# live in modules/topology, the configuration files in modules/config, the user-data in
# modules/user_data: their tests run offline (scripts/deploy-check.sh).

variable "region" {
  description = "AWS region."
  type        = string
}

variable "name" {
  description = "Prefix of every resource name (2 to 18 lowercase letters, digits, dashes)."
  type        = string
  default     = "ringpost"
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "coordinator_subnet_ids" {
  description = "Private subnets for the coordinators, one per availability zone, at least three zones. They need a route to HTTPS (a NAT gateway, or VPC endpoints for SSM) for the binary download and the parameter store."
  type        = list(string)
}

variable "node_subnet_ids" {
  description = "Public subnets (with an internet gateway) for the nodes and the load balancer, one per availability zone."
  type        = list(string)
}

variable "coordinator_count" {
  description = "3 or 5."
  type        = number
  default     = 3
}

variable "coordinator_instance_type" {
  description = "Coordinators hold the membership only: small instances do."
  type        = string
  default     = "t3.small"
}

variable "coordinator_volume_gib" {
  description = "Size of each coordinator's EBS data volume (the Raft log and snapshots)."
  type        = number
  default     = 20
  validation {
    condition     = var.coordinator_volume_gib >= 8
    error_message = "coordinator_volume_gib must be at least 8."
  }
}

variable "node_instance_type" {
  description = "Node instance type. Size it from docs/operations.md (about 8 KiB per WebSocket connection, kernel included) and BENCHMARKS.md."
  type        = string
  default     = "c6i.2xlarge"
}

variable "node_count" {
  description = "The node group's size: min, max, desired."
  type = object({
    min     = number
    max     = number
    desired = number
  })
  default = { min = 3, max = 12, desired = 3 }
}

variable "node_root_volume_gib" {
  description = "Size of each node's root volume, which holds its RocksDB (a replacement node starts empty and is caught up from the replicas)."
  type        = number
  default     = 100
}

variable "ami_id" {
  description = "AMI for every instance; empty: the latest Amazon Linux 2023 for the architecture (it has cloud-init, systemd and the AWS CLI the user-data needs)."
  type        = string
  default     = ""
}

variable "architecture" {
  description = "x86_64 or arm64: must match the instance types and the binaries."
  type        = string
  default     = "x86_64"
  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "node_binary" {
  description = "ringpost-node for the architecture: an HTTPS URL and its SHA-256."
  type = object({
    url    = string
    sha256 = string
  })
}

variable "coordinator_binary" {
  description = "ringpost-coordinator for the architecture: an HTTPS URL and its SHA-256."
  type = object({
    url    = string
    sha256 = string
  })
}

variable "ports" {
  description = "Listener ports; see modules/topology. Defaults: wss and QUIC on 443, admin 7780, peer 7790, raft 7400, coordinator clients 7401, coordinator_admin (the coordinators' metrics) 7402, no plain ws, no media."
  type        = any
  default     = {}
}

variable "client_cidrs" {
  description = "Who may reach the client ports."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_cidrs" {
  description = "Who may reach the nodes' and coordinators' admin ports (metrics, health) and the coordinators' client port (init, ctl): monitoring and the operators' bastion."
  type        = list(string)
}

variable "ws_driver" {
  description = "What drives the nodes' plain ws listener (needs ports.ws): tokio, or uring (io_uring, experimental; a drop-in lets the unit make its system calls; where the kernel still refuses it the node logs why and uses tokio). See modules/config."
  type        = string
  default     = "tokio"
}

variable "shard_count" {
  description = "Shards, fixed at `init`."
  type        = number
  default     = 4096
}

variable "replication_factor" {
  description = "Copies of each shard (1 to 3), given to `init`."
  type        = number
  default     = 2
}

variable "advertise_host" {
  description = "What each node tells redirected clients to connect to, from its instance metadata: {public_ipv4}, {public_ipv4_dashed}, {public_hostname}, {instance_id}. The TLS certificate must cover it."
  type        = string
  default     = "{public_ipv4}"
}

variable "ssm_parameters" {
  description = "Names of SecureString parameters in the SSM parameter store (created by you, outside Terraform, so that no secret is in the state): the cluster secret (32+ random bytes), the TLS certificate chain and key for wss and QUIC (an advanced-tier parameter if the chain is over 4 KB), and optionally the SMS gateway token."
  type = object({
    cluster_secret    = string
    tls_cert          = optional(string, "")
    tls_key           = optional(string, "")
    sms_gateway_token = optional(string, "")
  })
  validation {
    condition     = (var.ssm_parameters.tls_cert != "" && var.ssm_parameters.tls_key != "") || (try(var.ports.wss, 443) == 0 && try(var.ports.quic, 443) == 0)
    error_message = "wss and QUIC (on by default) need ssm_parameters.tls_cert and tls_key."
  }
}

variable "ssm_kms_key_arn" {
  description = "The KMS key of those parameters if it is not the AWS-managed aws/ssm key: the instances get kms:Decrypt on it."
  type        = string
  default     = ""
}

variable "sms_gateway_url" {
  description = "Where verification codes are POSTed (or set codes_to_log for a test cluster)."
  type        = string
  default     = ""
}

variable "codes_to_log" {
  description = "Test clusters only: verification codes to the log instead of an SMS gateway."
  type        = bool
  default     = false
}

variable "media_bucket" {
  description = "Create an S3 bucket for media blobs (encrypted, private, blobs expire after 31 days: 30 full days) and let the nodes use it. Needs ports.media and media_public_url."
  type        = bool
  default     = false
  validation {
    condition     = !var.media_bucket || try(var.ports.media, 0) > 0
    error_message = "media_bucket needs a media listener: set ports.media (e.g. 7781)."
  }
}

variable "media_public_url" {
  description = "The URL clients reach media at: the load balancer's TLS listener (ports.media_public), under a name your DNS points at it."
  type        = string
  default     = ""
}

variable "media_certificate_arn" {
  description = "ACM certificate for the media TLS listener."
  type        = string
  default     = ""
  validation {
    condition     = var.media_certificate_arn != "" || try(var.ports.media, 0) == 0
    error_message = "a media listener (ports.media) is served through the load balancer's TLS listener: give media_certificate_arn."
  }
}

variable "media_expiry_days" {
  description = "S3 expires blobs this many days after upload. S3 counts whole days, so 31 keeps every blob its 30 days (docs/operations.md, Media)."
  type        = number
  default     = 31
}

variable "lb_deletion_protection" {
  description = "Refuse to delete the load balancer (turn off before `terraform destroy`)."
  type        = bool
  default     = true
}

variable "lb_access_logs_bucket" {
  description = "Bucket for the load balancer's access logs (TLS listeners only); empty: none."
  type        = string
  default     = ""
}

variable "ssm_session_manager" {
  description = "Attach AmazonSSMManagedInstanceCore to the instance roles, for shell access without SSH. Off: nothing but the parameters and the media bucket."
  type        = bool
  default     = false
}
