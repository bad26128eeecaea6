#!/bin/sh
# Create the envpipe keys in the KMS emulator under their aliases, unless the aliases exist:
# safe to run on every start. The aliases and the endpoint are the workers' own settings
# (ENVPIPE_KMS_KEY_ID, ENVPIPE_SIGNING_KEY_ID, ENVPIPE_KMS_ENDPOINT), so they are named once.
set -eu
: "${ENVPIPE_KMS_ENDPOINT:?}" "${ENVPIPE_KMS_KEY_ID:?}" "${ENVPIPE_SIGNING_KEY_ID:?}"

kms() {
    aws --endpoint-url "$ENVPIPE_KMS_ENDPOINT" kms "$@"
}

# ensure_key ALIAS CREATE-KEY-ARGUMENTS...
ensure_key() {
    alias_name=$1
    shift
    if kms describe-key --key-id "$alias_name" > /dev/null 2>&1; then
        echo "$alias_name exists"
        return
    fi
    key_id=$(kms create-key "$@" --query KeyMetadata.KeyId --output text)
    kms create-alias --alias-name "$alias_name" --target-key-id "$key_id"
    echo "$alias_name -> $key_id"
}

ensure_key "$ENVPIPE_KMS_KEY_ID" \
    --key-spec SYMMETRIC_DEFAULT --key-usage ENCRYPT_DECRYPT \
    --description "envpipe demo: wraps data keys"
ensure_key "$ENVPIPE_SIGNING_KEY_ID" \
    --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY \
    --description "envpipe demo: signs envelope headers"
