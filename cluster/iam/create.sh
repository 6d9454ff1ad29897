#!/usr/bin/env bash
# Create the bucket rules, roles and instance profiles ray_cluster.yaml names (run once per account,
# from the repository root, with credentials that may manage IAM and S3):
#
#   cluster/iam/create.sh BUCKET [REGION]
#
# depthg-head   (head node):   S3 on BUCKET + what Ray's autoscaler needs (head-policy.json)
# depthg-worker (GPU workers): S3 on BUCKET only (s3-policy.json)
# BUCKET: created in REGION if missing, with a lifecycle rule that aborts multipart uploads left
# incomplete for a day (an interrupted shard upload otherwise keeps billing for its parts).
# Idempotent: existing roles and profiles are kept, their inline policies overwritten.
set -euo pipefail
BUCKET=${1:?usage: cluster/iam/create.sh BUCKET [REGION]}
REGION=${2:-us-west-2}
HERE=$(cd "$(dirname "$0")" && pwd)
ACCOUNT=$(aws sts get-caller-identity --query Account --output text)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for f in s3-policy.json head-policy.json; do
  sed -e "s/BUCKET/$BUCKET/g" -e "s/ACCOUNT/$ACCOUNT/g" "$HERE/$f" > "$TMP/$f"
done

if ! aws s3api head-bucket --bucket "$BUCKET" 2>/dev/null; then
  if [ "$REGION" = us-east-1 ]; then
    aws s3api create-bucket --bucket "$BUCKET" --region "$REGION"
  else
    aws s3api create-bucket --bucket "$BUCKET" --region "$REGION" \
      --create-bucket-configuration LocationConstraint="$REGION"
  fi
fi
aws s3api put-public-access-block --bucket "$BUCKET" --public-access-block-configuration \
  BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true
aws s3api put-bucket-lifecycle-configuration --bucket "$BUCKET" \
  --lifecycle-configuration "file://$HERE/bucket-lifecycle.json"

role() {  # role NAME POLICY...: the role, its inline policies, and an instance profile of the same name
  local name=$1; shift
  aws iam get-role --role-name "$name" >/dev/null 2>&1 || \
    aws iam create-role --role-name "$name" --assume-role-policy-document "file://$HERE/ec2-trust.json" >/dev/null
  for policy in "$@"; do
    aws iam put-role-policy --role-name "$name" --policy-name "${policy%.json}" \
      --policy-document "file://$TMP/$policy"
  done
  aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1 || \
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
  aws iam get-instance-profile --instance-profile-name "$name" --query 'InstanceProfile.Roles[].RoleName' \
    --output text | grep -qw "$name" || \
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
}
role depthg-worker s3-policy.json
role depthg-head s3-policy.json head-policy.json
echo "created: bucket s3://$BUCKET ($REGION, lifecycle rule), instance profiles depthg-head and depthg-worker"
echo "next: sed -i 's/BUCKET/$BUCKET/g' ray_cluster.yaml && ray up ray_cluster.yaml"
