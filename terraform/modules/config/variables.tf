variable "ports" {
  description = "The ports (the topology module's `ports` output); 0 turns a client listener off."
  type = object({
    ws                 = optional(number, 0)
    wss                = optional(number, 443)
    quic               = optional(number, 443)
    media              = optional(number, 0)
    media_public       = optional(number, 8443)
    admin              = optional(number, 7780)
    peer               = optional(number, 7790)
    raft               = optional(number, 7400)
    coordinator_client = optional(number, 7401)
    coordinator_admin  = optional(number, 7402)
  })
  default = {}
  validation {
    # coord.toml's admin_listen (metrics, /healthz): a real port, not one of the replica's others.
    condition     = var.ports.coordinator_admin >= 1 && var.ports.coordinator_admin <= 65535 && floor(var.ports.coordinator_admin) == var.ports.coordinator_admin && !contains([var.ports.raft, var.ports.coordinator_client], var.ports.coordinator_admin)
    error_message = "ports.coordinator_admin must be a port from 1 to 65535, other than raft and coordinator_client."
  }
}

variable "coordinators" {
  description = "The replicas (the topology module's `coordinators` output): replica_id and private_ip."
  type = list(object({
    replica_id = number
    private_ip = string
  }))
  validation {
    condition     = contains([1, 3, 5], length(var.coordinators))
    error_message = "1, 3 or 5 coordinators."
  }
}

variable "shard_count" {
  description = "Shards of the cluster (what `init` fixed)."
  type        = number
  default     = 4096
}

variable "replicate" {
  description = "Nodes replicate every shard write to its in-sync replicas (docs/replication.md)."
  type        = bool
  default     = true
}

variable "data_dir" {
  description = "The node's data directory (the unit's StateDirectory)."
  type        = string
  default     = "/var/lib/ringpost"
}

variable "coordinator_data_dir" {
  description = "The coordinator's data directory (the unit's StateDirectory; on EC2 its EBS volume)."
  type        = string
  default     = "/var/lib/ringpost-coordinator"
}

variable "config_dir" {
  description = "Where the configuration, the cluster secret and the TLS files live."
  type        = string
  default     = "/etc/ringpost"
}

variable "sms_gateway_url" {
  description = "Where verification codes are POSTed; its token goes in node.env (RINGPOST_SMS_GATEWAY_TOKEN). Give this or codes_to_log."
  type        = string
  default     = ""
  validation {
    condition     = var.sms_gateway_url == "" || can(regex("^https?://", var.sms_gateway_url))
    error_message = "sms_gateway_url must be an http:// or https:// URL."
  }
  validation {
    condition     = (var.sms_gateway_url != "") != var.codes_to_log
    error_message = "give exactly one of sms_gateway_url and codes_to_log (the node refuses both and neither)."
  }
}

variable "codes_to_log" {
  description = "Write verification codes to the log instead of an SMS gateway: test clusters only."
  type        = bool
  default     = false
}

variable "media_public_url" {
  description = "The URL clients reach the media listener at (the load balancer's TLS port), at most 72 bytes. Used when ports.media is set."
  type        = string
  default     = ""
  validation {
    condition     = length(var.media_public_url) <= 72
    error_message = "media_public_url is at most 72 bytes (granted URLs must fit the protocol's 256-byte strings)."
  }
}

variable "media_s3_bucket" {
  description = "The media bucket; empty keeps blobs in DATA_DIR/media on each node."
  type        = string
  default     = ""
}

variable "media_s3_region" {
  description = "The media bucket's region."
  type        = string
  default     = ""
}

variable "ws_driver" {
  description = "What drives the nodes' plain ws listener (ports.ws): tokio, or uring (io_uring, Linux 6.0+, experimental; where the kernel refuses it the node logs why and uses tokio). wss and QUIC always use tokio."
  type        = string
  default     = "tokio"
  validation {
    condition     = contains(["tokio", "uring"], var.ws_driver)
    error_message = "ws_driver must be tokio or uring."
  }
}

variable "log_format" {
  description = "human or json."
  type        = string
  default     = "json"
  validation {
    condition     = contains(["human", "json"], var.log_format)
    error_message = "log_format must be human or json."
  }
}

variable "node_extra" {
  description = "More node.toml keys (any `ringpost-node run` option, `_` for `-`), as strings. Must not repeat a key this module sets."
  type        = map(string)
  default     = {}
}

variable "coordinator_extra" {
  description = "More coord.toml keys (any `ringpost-coordinator run` option), as strings."
  type        = map(string)
  default     = {}
}
