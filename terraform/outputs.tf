output "load_balancer_dns_name" {
  description = "Point the service's DNS name (what clients connect to first) here."
  value       = aws_lb.node.dns_name
}

output "coordinator_client_addresses" {
  description = "The coordinators' client addresses, for ctl."
  value       = module.topology.coordinator_client_addresses
}

output "init_command" {
  description = "Run once from a host in admin_cidrs with the cluster secret in /etc/ringpost/cluster-secret, after the coordinators are up."
  value       = module.topology.init_command
}

output "media_bucket" {
  description = "The media bucket, if created."
  value       = var.media_bucket ? aws_s3_bucket.media[0].bucket : null
}

output "node_group" {
  description = "The nodes' auto-scaling group."
  value       = aws_autoscaling_group.node.name
}
